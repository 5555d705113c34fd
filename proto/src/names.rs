//! AIP-style resource names: parsing and formatting in one place, so every service agrees
//! on `tenants/{t}/applications/{a}/pipelines/{p}/tasks/{id}`.

use std::fmt;

/// Why a name did not parse; the caller adds the field it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameError(pub String);

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NameError {}

/// Most characters of an input value that a message quotes.
const SHOWN_CHARS: usize = 64;

/// `value` quoted for a message: its first [`SHOWN_CHARS`] characters and its size when it
/// is longer. A refusal travels in the `grpc-message` header, so it must stay small whatever
/// was sent (a 10 KB name quoted whole made the client see INTERNAL instead).
pub fn shown(value: &str) -> String {
    match value.char_indices().nth(SHOWN_CHARS) {
        None => format!("{value:?}"),
        Some((end, _)) => format!("{:?}... ({} bytes)", &value[..end], value.len()),
    }
}

/// Checks a resource id: 1..=63 of lowercase ASCII letters, digits and '-', starting with a
/// letter (the DNS-label shape Kubernetes users know).
pub fn check_id(id: &str) -> Result<(), NameError> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id.as_bytes()[0].is_ascii_lowercase()
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(NameError(format!(
            "{} is not a valid id: use 1 to 63 lowercase letters, digits and '-', starting with a letter",
            shown(id)
        )))
    }
}

fn segments<'a>(name: &'a str, collections: &[&str]) -> Result<Vec<&'a str>, NameError> {
    let parts: Vec<&str> = name.split('/').collect();
    let shape = || {
        let want: Vec<String> = collections.iter().map(|c| format!("{c}/{{id}}")).collect();
        NameError(format!(
            "{} is not of the form {}",
            shown(name),
            want.join("/")
        ))
    };
    if parts.len() != collections.len() * 2 {
        return Err(shape());
    }
    let mut ids = Vec::with_capacity(collections.len());
    for (pair, collection) in parts.chunks(2).zip(collections) {
        if pair[0] != *collection {
            return Err(shape());
        }
        ids.push(pair[1]);
    }
    Ok(ids)
}

/// `tenants/{tenant}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantName {
    pub tenant: String,
}

/// `tenants/{tenant}/applications/{application}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ApplicationName {
    pub tenant: String,
    pub application: String,
}

/// `tenants/{tenant}/applications/{application}/pipelines/{pipeline}`: also the ring key
/// of the pipeline's tasks.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PipelineName {
    pub tenant: String,
    pub application: String,
    pub pipeline: String,
}

/// `tenants/{t}/applications/{a}/pipelines/{p}/tasks/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskName {
    pub pipeline: PipelineName,
    pub task: String,
}

/// `tenants/{tenant}/clients/{client}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientName {
    pub tenant: String,
    pub client: String,
}

impl TenantName {
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let ids = segments(name, &["tenants"])?;
        check_id(ids[0])?;
        Ok(Self {
            tenant: ids[0].to_owned(),
        })
    }
}

impl ApplicationName {
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let ids = segments(name, &["tenants", "applications"])?;
        for id in &ids {
            check_id(id)?;
        }
        Ok(Self {
            tenant: ids[0].to_owned(),
            application: ids[1].to_owned(),
        })
    }

    pub fn tenant(&self) -> TenantName {
        TenantName {
            tenant: self.tenant.clone(),
        }
    }
}

impl PipelineName {
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let ids = segments(name, &["tenants", "applications", "pipelines"])?;
        for id in &ids {
            check_id(id)?;
        }
        Ok(Self {
            tenant: ids[0].to_owned(),
            application: ids[1].to_owned(),
            pipeline: ids[2].to_owned(),
        })
    }

    /// Checks that `name` is a pipeline's name, as [`PipelineName::parse`] does, without
    /// allocating, and gives its tenant: the submit path's form (a valid name is already
    /// its own canonical form, so there is nothing to rebuild).
    pub fn check(name: &str) -> Result<&str, NameError> {
        let mut parts = name.split('/');
        let mut tenant = None;
        for collection in ["tenants", "applications", "pipelines"] {
            match (parts.next(), parts.next()) {
                (Some(c), Some(id)) if c == collection && check_id(id).is_ok() => {
                    tenant.get_or_insert(id);
                }
                _ => return Err(Self::refusal(name)),
            }
        }
        match (parts.next(), tenant) {
            (None, Some(tenant)) => Ok(tenant),
            _ => Err(Self::refusal(name)),
        }
    }

    /// Why `parse` refuses `name`, with its message.
    fn refusal(name: &str) -> NameError {
        Self::parse(name)
            .err()
            .unwrap_or_else(|| NameError(format!("{} is not a pipeline's name", shown(name))))
    }

    pub fn application(&self) -> ApplicationName {
        ApplicationName {
            tenant: self.tenant.clone(),
            application: self.application.clone(),
        }
    }

    /// The short `tenant/app/pipeline` form pmctl accepts.
    pub fn parse_short(short: &str) -> Result<Self, NameError> {
        let parts: Vec<&str> = short.split('/').collect();
        match parts.as_slice() {
            [t, a, p] => Self::parse(&format!("tenants/{t}/applications/{a}/pipelines/{p}")),
            _ => Self::parse(short),
        }
    }
}

/// Partitions a task id has room for (12 bits); a spec allows fewer
/// (`pm_spec::MAX_PARTITIONS`).
pub const ID_PARTITIONS: u32 = 1 << 12;

/// A task id's partition, which routes every call on it (see [`with_partition`]).
pub fn partition_of_id(id: u128) -> u32 {
    if (id >> 76) & 0xf == 8 {
        ((id >> 64) & 0xfff) as u32
    } else {
        0
    }
}

/// Task id `id` (a UUIDv7) placed in `partition`. Partition 0 keeps it a UUIDv7, as every
/// id was before pipelines had partitions. Another partition makes it a UUIDv8 (version
/// nibble 8, the 13th hex digit) whose next 12 bits, 3 hex digits, hold the partition in
/// place of random bits: the order of ids stays their time order, and 62 random bits remain.
/// So a task's name alone says which ring key, so which shard, holds it.
pub fn with_partition(id: u128, partition: u32) -> u128 {
    if partition == 0 {
        return id;
    }
    assert!(
        partition < ID_PARTITIONS,
        "partition {partition} past the id's room"
    );
    let cleared = id & !(0xffff_u128 << 64);
    cleared | (0x8000 | u128::from(partition)) << 64
}

impl TaskName {
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let ids = segments(name, &["tenants", "applications", "pipelines", "tasks"])?;
        for id in &ids[..3] {
            check_id(id)?;
        }
        if ids[3].is_empty() || ids[3].len() > 128 {
            return Err(NameError(format!(
                "{} is not a valid task id",
                shown(ids[3])
            )));
        }
        Ok(Self {
            pipeline: PipelineName {
                tenant: ids[0].to_owned(),
                application: ids[1].to_owned(),
                pipeline: ids[2].to_owned(),
            },
            task: ids[3].to_owned(),
        })
    }
}

impl TaskName {
    /// The partition of its pipeline the task is in, read from its id; 0 for an id that is
    /// not 32 hex digits (none issued is not).
    pub fn partition(&self) -> u32 {
        let hex = self.task.len() == 32 && self.task.bytes().all(|b| b.is_ascii_hexdigit());
        match u128::from_str_radix(&self.task, 16) {
            Ok(id) if hex => partition_of_id(id),
            _ => 0,
        }
    }
}

impl ClientName {
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let ids = segments(name, &["tenants", "clients"])?;
        check_id(ids[0])?;
        if ids[1].is_empty() || ids[1].len() > 128 {
            return Err(NameError(format!(
                "{} is not a valid client id",
                shown(ids[1])
            )));
        }
        Ok(Self {
            tenant: ids[0].to_owned(),
            client: ids[1].to_owned(),
        })
    }
}

impl fmt::Display for TenantName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tenants/{}", self.tenant)
    }
}

impl fmt::Display for ApplicationName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tenants/{}/applications/{}",
            self.tenant, self.application
        )
    }
}

impl fmt::Display for PipelineName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tenants/{}/applications/{}/pipelines/{}",
            self.tenant, self.application, self.pipeline
        )
    }
}

impl fmt::Display for TaskName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/tasks/{}", self.pipeline, self.task)
    }
}

impl fmt::Display for ClientName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tenants/{}/clients/{}", self.tenant, self.client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_reject_bad_shapes() {
        let t = "tenants/acme/applications/ocr/pipelines/scan/tasks/01ab";
        let parsed = TaskName::parse(t).unwrap();
        assert_eq!(parsed.to_string(), t);
        assert_eq!(parsed.pipeline.pipeline, "scan");
        assert_eq!(
            PipelineName::parse_short("acme/ocr/scan").unwrap(),
            parsed.pipeline
        );
        assert!(PipelineName::parse("tenants/acme/applications/ocr").is_err());
        assert!(PipelineName::parse("tenants/Acme/applications/ocr/pipelines/x").is_err());
        assert!(TenantName::parse("tenants/").is_err());
        assert!(TenantName::parse("tenant/x").is_err());
        assert!(check_id(&"a".repeat(64)).is_err());
        assert!(check_id("9a").is_err());
        assert!(check_id("a-9").is_ok());
    }

    #[test]
    fn an_id_carries_its_partition_and_keeps_its_time_order() {
        let v7 = 0x0190_f3a2_b4c1_7abc_9def_0123_4567_89ab_u128;
        assert_eq!(partition_of_id(v7), 0, "a UUIDv7 is partition 0");
        assert_eq!(with_partition(v7, 0), v7);
        for p in [1, 5, 1023, ID_PARTITIONS - 1] {
            let id = with_partition(v7, p);
            assert_eq!(partition_of_id(id), p);
            assert_eq!(id >> 80, v7 >> 80, "the time is kept");
            assert_eq!(
                id & ((1 << 64) - 1),
                v7 & ((1 << 64) - 1),
                "the random bits too"
            );
            let name = TaskName::parse(&format!(
                "tenants/t/applications/a/pipelines/p/tasks/{id:032x}"
            ))
            .unwrap();
            assert_eq!(name.partition(), p);
        }
        let old = TaskName::parse(&format!(
            "tenants/t/applications/a/pipelines/p/tasks/{v7:032x}"
        ));
        assert_eq!(
            old.unwrap().partition(),
            0,
            "names issued before partitions"
        );
        let odd = TaskName::parse("tenants/t/applications/a/pipelines/p/tasks/x-1").unwrap();
        assert_eq!(odd.partition(), 0);
    }

    #[test]
    fn refusals_quote_a_long_value_cut() {
        assert_eq!(shown("abc"), "\"abc\"");
        let long = format!("{}é", "a".repeat(63));
        assert_eq!(
            shown(&long),
            format!("{long:?}"),
            "64 characters are quoted whole"
        );
        let longer = "é".repeat(10_000);
        let quoted = shown(&longer);
        assert!(quoted.ends_with("... (20000 bytes)"), "{quoted}");
        assert!(quoted.len() < 200, "{quoted}");
        let refusal = PipelineName::parse(&format!("tenants/{longer}")).unwrap_err();
        assert!(refusal.0.len() < 300, "{refusal}");
    }

    #[test]
    fn check_agrees_with_parse() {
        for name in [
            "tenants/acme/applications/ocr/pipelines/scan",
            "tenants/a/applications/b-2/pipelines/c",
            "tenants/acme/applications/ocr/pipelines/scan/",
            "tenants/acme/applications/ocr/pipelines/scan/tasks/x",
            "tenants/acme/applications/ocr/pipelines",
            "tenants/acme/applications/ocr",
            "tenants/acme/pipelines/ocr/applications/scan",
            "tenants/Acme/applications/ocr/pipelines/scan",
            "tenants//applications/ocr/pipelines/scan",
            "/tenants/acme/applications/ocr/pipelines/scan",
            "",
        ] {
            match (PipelineName::parse(name), PipelineName::check(name)) {
                (Ok(parsed), Ok(tenant)) => {
                    assert_eq!(tenant, parsed.tenant, "{name}");
                    assert_eq!(parsed.to_string(), name, "a valid name is canonical");
                }
                (Err(parsed), Err(checked)) => assert_eq!(parsed, checked, "{name}"),
                (parsed, checked) => panic!("{name}: parse {parsed:?}, check {checked:?}"),
            }
        }
    }
}
