//! Everything the host runtime reads from `/proc`, parsed in one place:
//! a process's start time and state (`/proc/PID/stat`), its memory
//! (`status`, `smaps_rollup`), and the host's memory (`/proc/meminfo`).
//! Readers return `None` when the process is gone or a field is missing.

/// The fields of `/proc/PID/stat` that zygote uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Process state (`R`, `S`, `D`, `Z`, ...).
    pub state: char,
    /// Start time in clock ticks since boot (field 22): with the pid, it
    /// names one process for good (a reused pid has another start time).
    pub start_ticks: u64,
}

impl Stat {
    /// Whether the process has exited and waits to be reaped.
    pub fn is_zombie(&self) -> bool {
        self.state == 'Z' || self.state == 'X'
    }
}

/// Parses the text of a `/proc/PID/stat` file.
pub fn parse_stat(text: &str) -> Option<Stat> {
    // The command name is in parentheses and may contain spaces and ')'.
    let rest = text.get(text.rfind(')')? + 2..)?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `rest` starts at field 3 (state); start time is field 22.
    let start_ticks = fields.nth(18)?.parse().ok()?;
    Some(Stat { state, start_ticks })
}

/// `/proc/PID/stat`.
pub fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// A process's start time (see [`Stat::start_ticks`]).
pub fn start_ticks(pid: u32) -> Option<u64> {
    stat(pid).map(|s| s.start_ticks)
}

/// Whether process `pid` still runs and is the one that started at
/// `start_ticks` (not a zombie, not a reused pid).
pub fn is_same_live_process(pid: u32, start_ticks: u64) -> bool {
    stat(pid).is_some_and(|s| !s.is_zombie() && s.start_ticks == start_ticks)
}

/// A `Name: value kB` field of a `/proc` text file, in KiB.
fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// A field of `/proc/PID/smaps_rollup` (`Pss`, `Private_Dirty`, ...), KiB.
pub fn smaps_rollup(pid: u32, field: &str) -> Option<u64> {
    kib_field(
        &std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?,
        field,
    )
}

/// Resident memory of a process from `/proc/PID/status`, KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rss {
    /// VmRSS.
    pub total: u64,
    /// RssAnon.
    pub anon: u64,
    /// RssFile.
    pub file: u64,
    /// RssShmem.
    pub shmem: u64,
}

/// `/proc/PID/status` resident memory.
pub fn rss(pid: u32) -> Option<Rss> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(Rss {
        total: kib_field(&s, "VmRSS")?,
        anon: kib_field(&s, "RssAnon")?,
        file: kib_field(&s, "RssFile")?,
        shmem: kib_field(&s, "RssShmem")?,
    })
}

/// Host memory from `/proc/meminfo`, KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    /// MemTotal.
    pub total: u64,
    /// MemAvailable.
    pub available: u64,
}

/// `/proc/meminfo`.
pub fn meminfo() -> Option<MemInfo> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    Some(MemInfo {
        total: kib_field(&s, "MemTotal")?,
        available: kib_field(&s, "MemAvailable")?,
    })
}

/// Total host RAM in MiB (`u64::MAX` when unknown: nothing is refused
/// for lack of a number).
pub fn host_memory_mib() -> u64 {
    meminfo().map_or(u64::MAX, |m| m.total / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        let line =
            "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 1 0 987654 1000 50";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                state: 'S',
                start_ticks: 987654
            })
        );
        assert!(parse_stat("garbage").is_none());
        assert!(parse_stat("1 (x) Z 1").is_none(), "too few fields");
    }

    #[test]
    fn this_process_is_readable_and_its_start_time_identifies_it() {
        let me = std::process::id();
        let st = stat(me).unwrap();
        assert!(!st.is_zombie());
        assert!(is_same_live_process(me, st.start_ticks));
        assert!(!is_same_live_process(me, st.start_ticks + 1));
        let r = rss(me).unwrap();
        assert!(r.total > 0 && r.anon + r.file <= r.total + 1);
        assert!(smaps_rollup(me, "Pss").unwrap() > 0);
        let m = meminfo().unwrap();
        assert!(m.total >= m.available && m.total > 0);
        assert!(host_memory_mib() > 0);
    }
}
