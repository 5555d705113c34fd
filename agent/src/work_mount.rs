//! The task's work directory at one fixed path, `/mnt/pipe`: where the source documents'
//! commands name their files (`wget -O /mnt/pipe/image.png ...`, `rm -r /mnt/pipe/*`).
//!
//! Every task still gets its own directory under the work root; what changes is how its
//! commands see it. [`WorkMount::probe`] picks, once at start, the first way this host
//! allows:
//! 1. **A private mount namespace per step** (`unshare(CLONE_NEWNS)`, needs CAP_SYS_ADMIN:
//!    root on a host): the step's shell starts with its task's directory bind-mounted at
//!    `/mnt/pipe`, visible to it and its children only. Concurrent tasks each see their own.
//! 2. **The same inside an unprivileged user namespace** (`CLONE_NEWUSER | CLONE_NEWNS`, where
//!    the kernel allows it), mapping only this user. If `/mnt/pipe` does not exist, an empty
//!    tmpfs is mounted on its parent first (so the step sees an empty `/mnt` besides `pipe`).
//! 3. **Exclusive**: no namespace is allowed here; `/mnt/pipe` itself is the work directory,
//!    emptied before and after each task, and the agent runs one task at a time.
//!
//! If none works (`/mnt/pipe` cannot be made), commands find their directory only as their
//! working directory and `$PM_WORK_DIR`, as without this module. The choice is logged at
//! start ([`WorkMount::describe`]).
//!
//! The namespace is entered between fork and exec ([`Binding::enter`]), so it must be
//! async-signal-safe: every path is a `CString` made before the fork, and only raw system
//! calls run after it.

use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::stat::Mode;

/// Where the source documents' commands expect their task's files.
pub const DEFAULT_AT: &str = "/mnt/pipe";

/// [`WorkMount::probe`] at `at`, if asked, logging the outcome; [`WorkMount::Off`] if not.
pub fn probe(at: Option<&Path>, work_root: &Path) -> WorkMount {
    let Some(at) = at else {
        return WorkMount::Off;
    };
    let mount = WorkMount::probe(at, work_root);
    tracing::info!("work directories: {}", mount.describe());
    mount
}

/// How a step enters its private mount namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// `unshare(CLONE_NEWNS)`: root (CAP_SYS_ADMIN).
    MountNamespace,
    /// `unshare(CLONE_NEWUSER | CLONE_NEWNS)`: unprivileged user namespaces.
    UserNamespace,
}

/// How tasks' work directories appear to their commands (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkMount {
    /// Only as the working directory and `$PM_WORK_DIR`.
    Off,
    /// Bound at `at` in a private mount namespace per step.
    Private {
        at: PathBuf,
        isolation: Isolation,
        /// `at` does not exist: mount an empty tmpfs on its parent and make it there.
        tmpfs_parent: bool,
    },
    /// `at` is the work directory; one task at a time.
    Exclusive { at: PathBuf },
}

impl WorkMount {
    /// Finds the first way this host allows to show work directories at `at` (see the module
    /// doc). `work_root` is where the agent makes them: it must stay reachable in the
    /// namespace. Blocking: it starts a probe process or two.
    pub fn probe(at: &Path, work_root: &Path) -> WorkMount {
        if !at.is_absolute() {
            return WorkMount::Off;
        }
        let Ok(scratch) = tempfile::Builder::new().prefix("pm-probe").tempdir() else {
            return WorkMount::Off;
        };
        let private = |isolation, tmpfs_parent| WorkMount::Private {
            at: at.to_owned(),
            isolation,
            tmpfs_parent,
        };
        // Root makes the mount point on the host, once; it stays an empty directory there.
        if std::fs::create_dir_all(at).is_ok() {
            for isolation in [Isolation::MountNamespace, Isolation::UserNamespace] {
                let mount = private(isolation, false);
                if mount.works(scratch.path()) {
                    return mount;
                }
            }
        } else if let Some(parent) = at.parent()
            && !work_root.starts_with(parent)
            && !scratch.path().starts_with(parent)
        {
            let mount = private(Isolation::UserNamespace, true);
            if mount.works(scratch.path()) {
                return mount;
            }
        }
        let writable = tempfile::tempfile_in(at).is_ok();
        if writable {
            WorkMount::Exclusive { at: at.to_owned() }
        } else {
            WorkMount::Off
        }
    }

    /// Whether a shell started with this mount sees `dir` at the mount point.
    fn works(&self, dir: &Path) -> bool {
        let Some(binding) = self.binding(dir) else {
            return false;
        };
        let marker = dir.join(".pm-probe");
        if std::fs::write(&marker, b"").is_err() {
            return false;
        }
        let mut command = std::process::Command::new("sh");
        command
            .args(["-c", "test -e .pm-probe && test \"$(pwd -P)\" = \"$1\""])
            .arg("sh")
            .arg(self.visible_dir(dir))
            .current_dir(dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        binding.attach(&mut command);
        command.status().is_ok_and(|s| s.success())
    }

    /// Tasks the agent may run at once under this mount, if it limits them.
    pub fn max_slots(&self) -> Option<u32> {
        matches!(self, WorkMount::Exclusive { .. }).then_some(1)
    }

    /// `slots` within [`WorkMount::max_slots`], said in the log when cut.
    pub fn limit_slots(&self, slots: u32) -> u32 {
        match self.max_slots() {
            Some(max) if slots > max => {
                tracing::warn!(slots, max, "slots limited: {}", self.describe());
                max
            }
            _ => slots,
        }
    }

    /// The mount for runs outside the agent's slots (direct runs): an exclusive mount point
    /// cannot be shared with them, so they keep their own directories.
    pub fn for_concurrent_runs(&self) -> WorkMount {
        match self {
            WorkMount::Exclusive { .. } => WorkMount::Off,
            other => other.clone(),
        }
    }

    /// The directory a task's commands run in: its own `work_dir`, or `at` itself when
    /// exclusive.
    pub fn work_dir(&self, own: PathBuf) -> PathBuf {
        match self {
            WorkMount::Exclusive { at } => at.clone(),
            _ => own,
        }
    }

    /// Where a task's commands see their work directory `work_dir`.
    pub fn visible_dir<'a>(&'a self, work_dir: &'a Path) -> &'a Path {
        match self {
            WorkMount::Private { at, .. } | WorkMount::Exclusive { at } => at,
            WorkMount::Off => work_dir,
        }
    }

    /// What a step must do before it runs to see `work_dir` at the mount point, if anything.
    pub fn binding(&self, work_dir: &Path) -> Option<Binding> {
        let WorkMount::Private {
            at,
            isolation,
            tmpfs_parent,
        } = self
        else {
            return None;
        };
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).ok();
        let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
        Some(Binding {
            source: c(work_dir)?,
            target: c(at)?,
            tmpfs: match tmpfs_parent {
                true => Some(c(at.parent()?)?),
                false => None,
            },
            isolation: *isolation,
            uid_map: CString::new(format!("{uid} {uid} 1")).ok()?,
            gid_map: CString::new(format!("{gid} {gid} 1")).ok()?,
        })
    }

    /// One line for the start-up log.
    pub fn describe(&self) -> String {
        match self {
            WorkMount::Off => "commands find their task's work directory as their working directory and $PM_WORK_DIR (no /mnt/pipe: it cannot be made here)".into(),
            WorkMount::Private { at, isolation: Isolation::MountNamespace, .. } => format!(
                "each task's work directory is at {} for its commands (a private mount namespace per step)",
                at.display()
            ),
            WorkMount::Private { at, isolation: Isolation::UserNamespace, tmpfs_parent } => format!(
                "each task's work directory is at {} for its commands (a private user and mount namespace per step{})",
                at.display(),
                if *tmpfs_parent { "; its parent is an empty tmpfs there" } else { "" }
            ),
            WorkMount::Exclusive { at } => format!(
                "no mount namespace allowed here: {} is the work directory and tasks run one at a time",
                at.display()
            ),
        }
    }
}

/// A step's way into its private mount namespace, prepared before the fork.
#[derive(Debug, Clone)]
pub struct Binding {
    source: CString,
    target: CString,
    tmpfs: Option<CString>,
    isolation: Isolation,
    uid_map: CString,
    gid_map: CString,
}

impl Binding {
    /// Where the step sees its work directory.
    pub fn target(&self) -> &Path {
        Path::new(std::ffi::OsStr::from_bytes(self.target.as_bytes()))
    }

    /// Makes `command` enter the namespace between fork and exec. The one unsafe use in
    /// the workspace: a hook between fork and exec has no safe form in std or tokio.
    #[allow(unsafe_code)]
    pub fn attach(&self, command: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        let binding = self.clone();
        // SAFETY: `enter` makes only system calls on data prepared before the fork.
        unsafe { command.pre_exec(move || binding.enter().map_err(std::io::Error::from)) };
    }

    /// The same for a tokio command.
    #[allow(unsafe_code)]
    pub fn attach_tokio(&self, command: &mut tokio::process::Command) {
        let binding = self.clone();
        // SAFETY: as in `attach`.
        unsafe { command.pre_exec(move || binding.enter().map_err(std::io::Error::from)) };
    }

    /// In the child, before exec: a private mount namespace with the work directory at the
    /// mount point, which becomes the working directory.
    fn enter(&self) -> nix::Result<()> {
        let none: Option<&CStr> = None;
        match self.isolation {
            Isolation::MountNamespace => unshare(CloneFlags::CLONE_NEWNS)?,
            Isolation::UserNamespace => {
                unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)?;
                write_file(c"/proc/self/setgroups", b"deny")?;
                write_file(c"/proc/self/uid_map", self.uid_map.as_bytes())?;
                write_file(c"/proc/self/gid_map", self.gid_map.as_bytes())?;
            }
        }
        // Nothing mounted here may reach the host's namespace.
        mount(
            none,
            c"/",
            none,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            none,
        )?;
        if let Some(parent) = &self.tmpfs {
            mount(
                Some(c"tmpfs"),
                parent.as_c_str(),
                Some(c"tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some(c"mode=0755"),
            )?;
            nix::unistd::mkdir(self.target.as_c_str(), Mode::from_bits_truncate(0o755))?;
        }
        mount(
            Some(self.source.as_c_str()),
            self.target.as_c_str(),
            none,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            none,
        )?;
        nix::unistd::chdir(self.target.as_c_str())
    }
}

fn write_file(path: &CStr, bytes: &[u8]) -> nix::Result<()> {
    use nix::fcntl::{OFlag, open};
    let fd = open(path, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())?;
    nix::unistd::write(&fd, bytes).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `script` in `work_dir` under `mount`; returns its stdout.
    fn run(mount: &WorkMount, work_dir: &Path, script: &str) -> String {
        let mut command = std::process::Command::new("sh");
        command.args(["-c", script]).current_dir(work_dir);
        if let Some(binding) = mount.binding(work_dir) {
            binding.attach(&mut command);
        }
        let out = command.output().unwrap();
        assert!(out.status.success(), "{script}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// Both namespaces (root may make either): two directories bound at the same path at
    /// once, each step seeing only its own files, and nothing left mounted on the host.
    #[test]
    fn concurrent_steps_each_see_their_own_directory_at_the_mount_point() {
        let root = tempfile::tempdir().unwrap();
        let at = root.path().join("pipe");
        std::fs::create_dir(&at).unwrap();
        for isolation in [Isolation::MountNamespace, Isolation::UserNamespace] {
            let mount = WorkMount::Private {
                at: at.clone(),
                isolation,
                tmpfs_parent: false,
            };
            if !mount.works(root.path()) {
                // Not root, or user namespaces are off here: the probe would skip it too.
                eprintln!("{isolation:?} is not allowed here; skipped");
                continue;
            }
            let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
            let pipe = &at.display().to_string();
            std::thread::scope(|s| {
                for (i, dir) in dirs.iter().enumerate() {
                    let mount = &mount;
                    s.spawn(move || {
                        let script = format!(
                            "echo {i} > {pipe}/mine && sleep 0.2 && cat {pipe}/mine && pwd && ls {pipe}"
                        );
                        let out = run(mount, dir.path(), &script);
                        assert_eq!(out, format!("{i}\n{pipe}\nmine\n"), "{isolation:?}");
                    });
                }
            });
            for (i, dir) in dirs.iter().enumerate() {
                let written = std::fs::read_to_string(dir.path().join("mine")).unwrap();
                assert_eq!(written, format!("{i}\n"));
            }
            assert_eq!(
                std::fs::read_dir(&at).unwrap().count(),
                0,
                "host sees nothing"
            );
        }
    }

    /// The unprivileged form where the mount point does not exist: an empty tmpfs on its
    /// parent, the mount point made there, nothing made on the host.
    #[test]
    fn a_missing_mount_point_is_made_on_a_private_tmpfs() {
        let parent = tempfile::tempdir().unwrap();
        let at = parent.path().join("pipe");
        let mount = WorkMount::Private {
            at: at.clone(),
            isolation: Isolation::UserNamespace,
            tmpfs_parent: true,
        };
        let dir = tempfile::tempdir().unwrap();
        if !mount.works(dir.path()) {
            eprintln!("user namespaces are not allowed here; skipped");
            return;
        }
        std::fs::write(dir.path().join("input"), "seen\n").unwrap();
        let out = run(&mount, dir.path(), &format!("cat {}/input", at.display()));
        assert_eq!(out, "seen\n");
        assert!(!at.exists(), "the mount point was made on the host");
    }

    #[test]
    fn exclusive_and_off_use_the_directory_they_name() {
        let own = PathBuf::from("/data/work/t1");
        let exclusive = WorkMount::Exclusive {
            at: PathBuf::from("/mnt/pipe"),
        };
        assert_eq!(exclusive.work_dir(own.clone()), Path::new("/mnt/pipe"));
        assert_eq!(exclusive.max_slots(), Some(1));
        assert!(exclusive.binding(&own).is_none());
        assert_eq!(WorkMount::Off.work_dir(own.clone()), own);
        assert_eq!(WorkMount::Off.visible_dir(&own), own);
        assert_eq!(WorkMount::Off.max_slots(), None);
    }

    #[test]
    fn a_relative_mount_point_is_refused() {
        assert_eq!(
            WorkMount::probe(Path::new("pipe"), Path::new("/tmp")),
            WorkMount::Off
        );
    }
}
