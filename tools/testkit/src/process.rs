//! Processes for tests and tools: how a child is launched (pinned to a core, stopped with its
//! parent), a guard that stops it when dropped (SIGTERM, a grace period, then SIGKILL for it
//! and its helpers), signals by pid, and what this machine has (`have`, `is_root`). Signals
//! go through kill(1): this crate has no `unsafe`. Must not signal a process it was not given.

use crate::error;
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// How long a dropped guard waits after SIGTERM before SIGKILL, unless told otherwise.
const GRACE_DEFAULT: Duration = Duration::from_secs(15);
/// How often a waiting guard looks at its child.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Sends `signal` (a kill(1) name such as `TERM`, `KILL`, `HUP`) to `pid`.
pub fn send_signal(pid: u32, signal: &str) -> io::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(std::process::Stdio::null())
        .status()?;
    if !status.success() {
        return Err(error(format!("kill -{signal} {pid}: {status}")));
    }
    Ok(())
}

/// True when running as root (the effective uid in /proc/self/status).
pub fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

/// True when `tool` is on the PATH (or in /sbin, /usr/sbin, where root's tools live).
pub fn have(tool: &str) -> bool {
    find_program(tool).is_some()
}

/// Where `tool` is: the PATH first, then /usr/sbin and /sbin.
pub(crate) fn find_program(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(tool))
        .find(|candidate| candidate.is_file());
    found
}

/// Every process's pid (from /proc).
pub fn pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The parent of `pid` (from /proc/PID/stat; None when it is gone).
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the name in parentheses: state, then the parent's pid.
    stat.get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The pids whose parent is `pid` (empty when it has none or is gone).
pub(crate) fn children_of(pid: u32) -> Vec<u32> {
    pids()
        .into_iter()
        .filter(|child| parent_of(*child) == Some(pid))
        .collect()
}

/// How a child is started. The child's pid stays the program's: sh, setpriv and taskset
/// exec it.
#[derive(Clone, Debug, Default)]
pub struct Launch {
    /// Under `setpriv --pdeathsig TERM` (when setpriv is there), so the child stops if this
    /// process dies without running its guards (SIGINT, SIGKILL).
    pub stop_with_parent: bool,
    /// Under `taskset -c CORE`.
    pub core: Option<usize>,
    /// A cgroup's `cgroup.procs` file: the child writes its own pid there (through `sh`)
    /// before it execs the program, so everything the program does is charged to that group.
    pub cgroup_procs: Option<PathBuf>,
}

impl Launch {
    /// A `Command` that starts `program` this way.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut words: Vec<OsString> = Vec::new();
        if let Some(procs) = &self.cgroup_procs {
            // sh -c SCRIPT $0 "$@": $0 is the procs file, the rest the command to exec.
            words.extend(["sh", "-c", "echo $$ > \"$0\" && exec \"$@\""].map(OsString::from));
            words.push(procs.clone().into_os_string());
        }
        if self.stop_with_parent && have("setpriv") {
            words.extend(["setpriv", "--pdeathsig", "TERM"].map(OsString::from));
        }
        if let Some(core) = self.core {
            words.extend(["taskset".into(), "-c".into(), core.to_string().into()]);
        }
        words.push(program.as_ref().to_os_string());
        let mut command = Command::new(&words[0]);
        command.args(&words[1..]);
        command
    }
}

/// A child process stopped when dropped: SIGTERM, up to its grace period, then SIGKILL for it
/// and for its helpers (processes SIGKILL would orphan, such as nginx's worker).
pub struct Guard {
    name: String,
    child: Child,
    helpers: Vec<u32>,
    grace: Duration,
}

impl Guard {
    /// Guards `child`, called `name` in messages; 15 s of grace when dropped.
    pub fn new(name: &str, child: Child) -> Guard {
        Guard {
            name: name.to_string(),
            child,
            helpers: Vec::new(),
            grace: GRACE_DEFAULT,
        }
    }

    /// The grace period a drop gives the child after SIGTERM.
    pub fn with_grace(mut self, grace: Duration) -> Guard {
        self.grace = grace;
        self
    }

    /// A process to SIGKILL as well if the child has to be killed.
    pub fn add_helper(&mut self, pid: u32) {
        self.helpers.push(pid);
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child, for its pipes and `try_wait`.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// True while the child has not exited.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `signal` (`HUP`, `TERM`, ...) to the child.
    pub fn signal(&self, signal: &str) -> io::Result<()> {
        send_signal(self.pid(), signal)
    }

    /// Waits up to `within` for the child to exit; its status, or None if it still runs.
    pub fn wait_exit(&mut self, within: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// SIGKILL now (the helpers too), then reaps the child.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        let _ = self.child.kill();
        let status = self.child.wait()?;
        for helper in &self.helpers {
            let _ = send_signal(*helper, "KILL");
        }
        Ok(status)
    }

    /// SIGTERM, then waits up to `grace`; SIGKILL after that. Returns how the child ended.
    pub fn stop(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        let _ = self.signal("TERM");
        if let Some(status) = self.wait_exit(grace)? {
            return Ok(status);
        }
        eprintln!(
            "{} (pid {}) did not stop within {grace:?} of SIGTERM; killing it",
            self.name,
            self.pid()
        );
        self.kill()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.stop(self.grace);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn sleeper(script: &str) -> Guard {
        let child = Command::new("sh").args(["-c", script]).spawn().unwrap();
        Guard::new("sh", child)
    }

    #[test]
    fn stop_ends_with_sigterm_or_else_sigkill() {
        let mut polite = sleeper("exec sleep 30");
        let status = polite.stop(Duration::from_secs(5)).unwrap();
        assert_eq!(status.signal(), Some(15), "{status}");
        // A child that ignores SIGTERM is killed once the grace period is over.
        let mut stubborn = sleeper("trap '' TERM; while :; do sleep 0.1; done");
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        let status = stubborn.stop(Duration::from_millis(300)).unwrap();
        assert_eq!(status.signal(), Some(9), "{status}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!stubborn.alive());
    }

    #[test]
    fn children_are_found_by_parent() {
        let mut parent = sleeper("sleep 30 & sleep 30 & wait");
        let deadline = Instant::now() + Duration::from_secs(5);
        while children_of(parent.pid()).len() < 2 {
            assert!(Instant::now() < deadline, "{:?}", children_of(parent.pid()));
            std::thread::sleep(Duration::from_millis(20));
        }
        for helper in children_of(parent.pid()) {
            parent.add_helper(helper);
        }
        let helpers = children_of(parent.pid());
        parent.kill().unwrap();
        for helper in helpers {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Path::new(&format!("/proc/{helper}")).exists()
                && !std::fs::read_to_string(format!("/proc/{helper}/stat"))
                    .unwrap_or_default()
                    .contains(") Z")
            {
                assert!(Instant::now() < deadline, "helper {helper} survived");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    #[test]
    fn launch_wraps_the_program() {
        let command = Launch {
            core: Some(1),
            ..Launch::default()
        }
        .command("wrk");
        let words: Vec<&OsStr> = std::iter::once(command.get_program())
            .chain(command.get_args())
            .collect();
        assert_eq!(words, ["taskset", "-c", "1", "wrk"]);
        assert_eq!(Launch::default().command("wrk").get_program(), "wrk");
        let joined = Launch {
            cgroup_procs: Some("/cg/cgroup.procs".into()),
            ..Launch::default()
        }
        .command("wrk");
        let words: Vec<&OsStr> = joined.get_args().collect();
        assert_eq!(joined.get_program(), "sh");
        assert_eq!(words[2..], ["/cg/cgroup.procs", "wrk"]);
        // The shell joins the group, then becomes the program: the pid stays the child's.
        let child = Launch {
            cgroup_procs: Some("/dev/null".into()),
            ..Launch::default()
        }
        .command("sh")
        .args(["-c", "echo $$"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), pid.to_string());
    }
}
