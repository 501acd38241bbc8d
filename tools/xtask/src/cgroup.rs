//! Memory cgroups for the benchmarks: a child group per server under test whose memory limit
//! bounds the page cache charged to it (cgroup v1 `memory.limit_in_bytes`, or v2 `memory.max`
//! when /sys/fs/cgroup/cgroup.controllers exists), joined by the server before it reads a
//! file (`Launch::cgroup_procs`), and removed when dropped. Needs root; must not touch a
//! group it did not create.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Which cgroup hierarchy the memory controller lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    /// /sys/fs/cgroup/memory/...: `memory.limit_in_bytes`, `memory.stat` `cache`.
    V1,
    /// /sys/fs/cgroup/... (unified): `memory.max`, `memory.stat` `file`.
    V2,
}

const ROOT: &str = "/sys/fs/cgroup";

/// A memory cgroup of this process's making; removed on drop (its processes are moved to
/// the parent group first, so a server that outlived its guard does not keep it).
pub struct MemoryCgroup {
    path: PathBuf,
    version: Version,
}

impl MemoryCgroup {
    /// Creates `/sys/fs/cgroup[/memory]/appliance-bench/NAME` (emptied first if an interrupted
    /// run left it) without a limit.
    pub fn create(name: &str) -> Result<MemoryCgroup> {
        let version = if Path::new(ROOT).join("cgroup.controllers").exists() {
            Version::V2
        } else if Path::new(ROOT).join("memory/cgroup.procs").exists() {
            Version::V1
        } else {
            bail!("no memory cgroup controller under {ROOT} (neither v2 nor v1 memory)");
        };
        let parent = match version {
            Version::V1 => Path::new(ROOT).join("memory/appliance-bench"),
            Version::V2 => Path::new(ROOT).join("appliance-bench"),
        };
        if !parent.exists() {
            std::fs::create_dir(&parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        if version == Version::V2 {
            // The children of appliance-bench may use the memory controller.
            let _ = std::fs::write(Path::new(ROOT).join("cgroup.subtree_control"), "+memory");
            std::fs::write(parent.join("cgroup.subtree_control"), "+memory")
                .with_context(|| format!("enabling memory in {}", parent.display()))?;
        }
        let group = MemoryCgroup {
            path: parent.join(name),
            version,
        };
        if group.path.exists() {
            group.remove()?;
        }
        std::fs::create_dir(&group.path)
            .with_context(|| format!("creating {}", group.path.display()))?;
        Ok(group)
    }

    /// The file a process writes its pid to in order to join the group.
    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// Limits the group's memory (page cache included) to `bytes`; None lifts the limit.
    pub fn set_limit(&self, bytes: Option<u64>) -> Result<()> {
        let (file, value) = match (self.version, bytes) {
            (Version::V1, Some(bytes)) => ("memory.limit_in_bytes", bytes.to_string()),
            (Version::V1, None) => ("memory.limit_in_bytes", "-1".to_string()),
            (Version::V2, Some(bytes)) => ("memory.max", bytes.to_string()),
            (Version::V2, None) => ("memory.max", "max".to_string()),
        };
        let path = self.path.join(file);
        std::fs::write(&path, &value)
            .with_context(|| format!("writing {value} to {}", path.display()))
    }

    /// Page cache charged to the group now, in bytes (`cache` in v1, `file` in v2).
    pub fn page_cache_bytes(&self) -> Option<u64> {
        let key = match self.version {
            Version::V1 => "cache",
            Version::V2 => "file",
        };
        let text = std::fs::read_to_string(self.path.join("memory.stat")).ok()?;
        text.lines().find_map(|line| {
            let (name, value) = line.split_once(' ')?;
            (name == key).then(|| value.trim().parse().ok())?
        })
    }

    /// The pids in the group.
    fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.procs_file())
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .collect()
    }

    /// Moves any process left to the parent group and removes the group's folder.
    fn remove(&self) -> Result<()> {
        let parent_procs = self
            .path
            .parent()
            .context("a cgroup has a parent")?
            .parent()
            .context("appliance-bench has a parent")?
            .join("cgroup.procs");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            for pid in self.pids() {
                let _ = std::fs::write(&parent_procs, pid.to_string());
            }
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(error) if Instant::now() > deadline => {
                    return Err(error).with_context(|| format!("removing {}", self.path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        if let Err(error) = self.remove() {
            eprintln!("{error:#}");
        }
        // The shared parent goes when it is empty (another group of this run may remain).
        if let Some(parent) = self.path.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}
