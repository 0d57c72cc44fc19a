//! What the CLI prints for lists and start timings, in one place, so that
//! the local commands (over the `host` library) and the remote ones (over
//! the daemon) print the same columns and the same lines.
//!
//! It must not: fetch anything or decide what to show; callers pass rows.

use std::fmt::Write;

use host::clone::CloneStatus;

/// One row of `zygote master ls`.
#[derive(Debug, Clone, PartialEq)]
pub struct MasterRow<'a> {
    /// Name.
    pub name: &'a str,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Live clones.
    pub clones: usize,
    /// The warm-up command.
    pub warmup: Option<&'a str>,
}

/// The `zygote master ls` table, header included, one line per row.
pub fn masters_table(rows: &[MasterRow]) -> String {
    let mut s = format!(
        "{:<24} {:>8} {:>5} {:>7}  WARMUP\n",
        "NAME", "MEMORY", "VCPUS", "CLONES"
    );
    for m in rows {
        let _ = writeln!(
            s,
            "{:<24} {:>5}MiB {:>5} {:>7}  {}",
            m.name,
            m.memory_mib,
            m.vcpus,
            m.clones,
            m.warmup.unwrap_or("-")
        );
    }
    s
}

/// A master's JSON object for `zygote master ls --json`: its fields and
/// `clones`, the number of live clones.
pub fn master_json(mut fields: serde_json::Value, clones: usize) -> serde_json::Value {
    fields["clones"] = clones.into();
    fields
}

/// The `zygote ps` table, header included, one line per clone.
pub fn ps_table(rows: &[CloneStatus]) -> String {
    let mut s = format!(
        "{:<32} {:<20} {:>8} {:>8} {:>12}  STATE\n",
        "ID", "MASTER", "PID", "AGE", "PRIVATE"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<32} {:<20} {:>8} {:>7}s {:>12}  {}",
            r.id,
            r.master,
            r.pid,
            r.age_s,
            r.private_kib.map_or("-".into(), |k| format!("{k} KiB")),
            r.state
        );
    }
    s
}

/// Milliseconds from a clone's VMM spawn to each phase of its start.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CloneTimes {
    /// vCPUs resumed the guest.
    pub running_ms: Option<f64>,
    /// The agent's hello arrived.
    pub connected_ms: Option<f64>,
    /// The identity was applied.
    pub identity_ms: Option<f64>,
    /// The agent answered a ping.
    pub ready_ms: Option<f64>,
}

/// The stderr line `zygote clone --timings` prints for one clone (scripts
/// such as `scripts/demo` parse it).
pub fn clone_timings_line(id: &str, t: &CloneTimes) -> String {
    let ms = |v: Option<f64>| v.unwrap_or(f64::NAN);
    format!(
        "zygote: {id}: vCPUs running +{:.1} ms, agent connected +{:.1} ms, identity set +{:.1} ms, ping answered +{:.1} ms",
        ms(t.running_ms),
        ms(t.connected_ms),
        ms(t.identity_ms),
        ms(t.ready_ms),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masters_table_lines_up() {
        let t = masters_table(&[
            MasterRow {
                name: "demo",
                memory_mib: 256,
                vcpus: 1,
                clones: 3,
                warmup: Some("sleep 1"),
            },
            MasterRow {
                name: "bare",
                memory_mib: 128,
                vcpus: 2,
                clones: 0,
                warmup: None,
            },
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines,
            [
                "NAME                       MEMORY VCPUS  CLONES  WARMUP",
                "demo                       256MiB     1       3  sleep 1",
                "bare                       128MiB     2       0  -",
            ]
        );
    }

    #[test]
    fn ps_table_lines_up() {
        let row = CloneStatus {
            id: "demo-abc".into(),
            master: "demo".into(),
            pid: 4242,
            state: "running".into(),
            age_s: 12,
            private_kib: Some(1536),
            pss_kib: Some(9000),
        };
        let dead = CloneStatus {
            state: "exited: killed".into(),
            private_kib: None,
            ..row.clone()
        };
        let t = ps_table(&[row, dead]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[0],
            "ID                               MASTER                    PID      AGE      PRIVATE  STATE"
        );
        assert_eq!(
            lines[1],
            "demo-abc                         demo                     4242      12s     1536 KiB  running"
        );
        assert!(
            lines[2].ends_with("           -  exited: killed"),
            "{}",
            lines[2]
        );
    }

    #[test]
    fn timings_line_is_what_the_demo_parses() {
        let l = clone_timings_line(
            "demo-1",
            &CloneTimes {
                running_ms: Some(1.26),
                connected_ms: Some(10.0),
                identity_ms: Some(11.04),
                ready_ms: None,
            },
        );
        assert_eq!(
            l,
            "zygote: demo-1: vCPUs running +1.3 ms, agent connected +10.0 ms, identity set +11.0 ms, ping answered +NaN ms"
        );
    }

    #[test]
    fn master_json_adds_clones() {
        let v = master_json(serde_json::json!({"name": "demo", "boot_ms": 1.5}), 2);
        assert_eq!(
            v,
            serde_json::json!({"name": "demo", "boot_ms": 1.5, "clones": 2})
        );
    }
}
