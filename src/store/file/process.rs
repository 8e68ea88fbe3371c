//! Who holds a slot or a probe: a process id plus that process's start
//! time, so a holder record cannot be inherited by an unrelated process
//! that happens to get the same id later.
//!
//! On Linux the start time is field 22 of `/proc/<pid>/stat` (clock ticks
//! since boot): the kernel sets it when the process is created and no
//! process can change it, so a reused PID comes with a different one. A
//! zombie (state `Z`, or `X` while being reaped) has finished and holds
//! nothing. Elsewhere only the PID is checked, with `kill(pid, 0)`.

use std::sync::OnceLock;

/// A process, as holder records name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Process {
    pub(crate) pid: u32,
    /// The start time, where the platform tells it.
    pub(crate) start: Option<u64>,
}

/// This process.
pub(crate) fn me() -> Process {
    static ME: OnceLock<Process> = OnceLock::new();
    *ME.get_or_init(|| {
        let pid = std::process::id();
        Process {
            pid,
            start: stat(pid).and_then(|s| s.start),
        }
    })
}

/// What `/proc/<pid>/stat` says of a process that exists.
struct Stat {
    finished: bool,
    start: Option<u64>,
}

/// `None` if the process does not exist (or `/proc` cannot tell).
fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses a `/proc/<pid>/stat` line. The command name (field 2) is in
/// parentheses and may hold spaces and parentheses itself, so the fields
/// are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?; // field 3
    let start = fields.nth(18).and_then(|s| s.parse().ok()); // field 22
    Some(Stat {
        finished: matches!(state, "Z" | "X" | "x"),
        start,
    })
}

/// Whether the process a holder record names is still the one that made
/// it and still running. A record without a start time (written by an
/// older release) is checked by its PID alone.
pub(crate) fn alive(pid: u32, start: Option<u64>) -> bool {
    if cfg!(target_os = "linux") {
        if let Some(s) = stat(pid) {
            return !s.finished && (start.is_none() || s.start.is_none() || s.start == start);
        }
        if std::path::Path::new("/proc/self/stat").exists() {
            return false; // /proc works and has no such process
        }
    }
    signal_alive(pid)
}

/// Whether `kill(pid, 0)` finds the process. One we may not signal is
/// alive; on platforms without the call every process is.
fn signal_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Some(p) = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        else {
            return false;
        };
        !matches!(
            rustix::process::test_kill_process(p),
            Err(rustix::io::Errno::SRCH)
        )
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_with_parentheses_and_spaces() {
        let line = "42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 777 19 20";
        let s = parse_stat(line).unwrap();
        assert!(!s.finished);
        assert_eq!(s.start, Some(777));
        let z = parse_stat("7 (x) Z 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 5").unwrap();
        assert!(z.finished);
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn this_process_is_alive_only_with_its_own_start_time() {
        let me = me();
        assert!(alive(me.pid, me.start));
        assert!(alive(me.pid, None));
        if let Some(start) = me.start {
            assert!(!alive(me.pid, Some(start + 1)), "a reused pid");
        }
    }

    #[test]
    fn a_reaped_child_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let id = child.id();
        child.wait().unwrap();
        assert!(!alive(id, None));
    }
}
