//! Task keys: a task's id as the number it is.
//!
//! Every task id a shard issues is a UUIDv7 written as 32 lowercase hex digits, so it fits a
//! `u128` whose order is the id's order (time order), and a task's name is its pipeline's
//! name, `/tasks/`, and the id. The shard's indexes hold this 16-byte key, not the ~90-byte
//! name: no string per task, and comparisons of two numbers instead of two long strings that
//! share their prefix. Keys are unique on a shard (74 random bits per id); a record keeps its
//! pipeline, and a name is only accepted when both parts match.
//!
//! A task of a partition other than 0 has that partition in its id, which makes it a UUIDv8
//! with 62 random bits (the layout is [`pm_proto::names::with_partition`]'s).

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskKey(pub u128);

impl TaskKey {
    /// A new, time-ordered key (a UUIDv7).
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().as_u128())
    }

    /// A new key of a task in `partition` of its pipeline.
    pub fn generate_in(partition: u32) -> Self {
        Self(pm_proto::names::with_partition(
            uuid::Uuid::now_v7().as_u128(),
            partition,
        ))
    }

    /// The partition of its pipeline the task is in.
    pub fn partition(self) -> u32 {
        pm_proto::names::partition_of_id(self.0)
    }

    /// When the task was submitted, ms since the Unix epoch: a UUIDv7's first 48 bits.
    pub fn created_ms(self) -> u64 {
        (self.0 >> 80) as u64
    }

    /// The key of a task id; `None` unless 32 lowercase hex digits.
    pub fn parse_id(id: &str) -> Option<Self> {
        if id.len() != 32 || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        u128::from_str_radix(id, 16).ok().map(Self)
    }

    /// The pipeline and the key in a task name (`{pipeline}/tasks/{id}`).
    pub fn parse_name(name: &str) -> Option<(&str, Self)> {
        // The id is the last 32 bytes (a restart parses a million names: no search).
        const SEPARATOR: &str = "/tasks/";
        let split = name.len().checked_sub(32 + SEPARATOR.len())?;
        let (pipeline, rest) = (name.get(..split)?, name.get(split..)?);
        let id = rest.strip_prefix(SEPARATOR)?;
        Some((pipeline, Self::parse_id(id)?))
    }

    /// The name of this task of `pipeline`.
    pub fn name(self, pipeline: &str) -> String {
        const TASKS: &str = "/tasks/";
        let mut name = String::with_capacity(pipeline.len() + TASKS.len() + 32);
        name.push_str(pipeline);
        name.push_str(TASKS);
        name.push_str(self.hex().as_str());
        name
    }

    /// The id's 32 lowercase hex digits, written without `fmt`'s machinery (every submit
    /// writes one, inside its name).
    fn hex(self) -> Hex {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 32];
        for (i, digit) in out.iter_mut().enumerate() {
            *digit = DIGITS[(self.0 >> (124 - 4 * i) & 0xf) as usize];
        }
        Hex(out)
    }
}

/// Hex digits: ASCII by construction.
struct Hex([u8; 32]);

impl Hex {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }
}

/// The task id: 32 lowercase hex digits.
impl fmt::Display for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.hex().as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_round_trip_in_order() {
        let (a, b) = (TaskKey::generate(), TaskKey::generate());
        assert!(a < b, "UUIDv7 keys are time-ordered");
        assert!(a.to_string() < b.to_string(), "and so are their ids");
        let uuid = uuid::Uuid::from_u128(a.0).simple().to_string();
        assert_eq!(a.to_string(), uuid);
        for small in [0, 0xab, u128::MAX] {
            assert_eq!(TaskKey(small).to_string(), format!("{small:032x}"));
        }
        let name = a.name("tenants/t/applications/a/pipelines/p");
        assert_eq!(
            TaskKey::parse_name(&name),
            Some(("tenants/t/applications/a/pipelines/p", a))
        );
        for bad in [
            "",
            "0193",
            "0193AAAA0000700080000000000000aa",
            "0193aaaa-0000-7000-8000-0000000000",
            "+193aaaa0000700080000000000000aa",
        ] {
            assert_eq!(TaskKey::parse_id(bad), None, "{bad:?}");
        }
        assert_eq!(TaskKey::parse_name("tenants/t/tasks"), None);
        assert_eq!(TaskKey::parse_name(&format!("{name}0")), None);
        assert_eq!(TaskKey::parse_name(&name[1..]).map(|(_, k)| k), Some(a));
    }

    #[test]
    fn a_key_carries_its_partition_in_time_order() {
        let (a, b, c) = (
            TaskKey::generate_in(0),
            TaskKey::generate_in(7),
            TaskKey::generate(),
        );
        assert_eq!((a.partition(), b.partition(), c.partition()), (0, 7, 0));
        assert!(a.created_ms() <= b.created_ms() && b.created_ms() <= c.created_ms());
        assert_eq!(TaskKey::parse_id(&b.to_string()), Some(b));
    }
}
