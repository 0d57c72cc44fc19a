//! The serial console's output: forwarded to a file or the caller, and
//! scanned line by line for the agent's markers and kernel panics.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use proto::events::{now_us, Event, EventSink};

/// Lines the console remembers for error reports.
const TAIL_LINES: usize = 40;

/// State shared between the console and the rest of the VMM.
#[derive(Default)]
pub struct ConsoleState {
    /// A "Kernel panic" line was seen.
    pub panicked: AtomicBool,
    tail: std::sync::Mutex<std::collections::VecDeque<String>>,
}

impl ConsoleState {
    /// The last lines of console output.
    pub fn tail(&self) -> Vec<String> {
        self.tail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// Writer behind the serial device.
pub struct ConsoleSink {
    out: Option<Box<dyn Write + Send>>,
    line: Vec<u8>,
    state: Arc<ConsoleState>,
    events: Arc<EventSink>,
}

impl ConsoleSink {
    /// Forwards console bytes to `out` (if any) and reports markers to `events`.
    pub fn new(
        out: Option<Box<dyn Write + Send>>,
        state: Arc<ConsoleState>,
        events: Arc<EventSink>,
    ) -> Self {
        ConsoleSink {
            out,
            line: Vec::with_capacity(256),
            state,
            events,
        }
    }

    fn end_line(&mut self) {
        let text = String::from_utf8_lossy(&self.line)
            .trim_end_matches('\r')
            .to_string();
        self.line.clear();
        if text.starts_with(proto::START_MARKER) {
            self.events.emit(&Event::AgentStart { t_us: now_us() });
        } else if text.starts_with(proto::READY_MARKER) {
            self.events.emit(&Event::AgentReady { t_us: now_us() });
        } else if text.contains("Kernel panic - not syncing") {
            self.state.panicked.store(true, Ordering::SeqCst);
        }
        let mut tail = self.state.tail.lock().unwrap_or_else(|e| e.into_inner());
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(text);
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(out) = self.out.as_mut() {
            // The console must never stop the guest: drop output we cannot write.
            let _ = out.write_all(buf);
        }
        for &b in buf {
            if b == b'\n' {
                if let Some(out) = self.out.as_mut() {
                    let _ = out.flush();
                }
                self.end_line();
            } else if self.line.len() < 4096 {
                self.line.push(b);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn markers_become_events_and_panics_are_noticed() {
        let ev = Shared::default();
        let out = Shared::default();
        let events = Arc::new(EventSink::new(Box::new(ev.clone())));
        let state = Arc::new(ConsoleState::default());
        let mut sink = ConsoleSink::new(Some(Box::new(out.clone())), state.clone(), events);
        let text = format!(
            "boot\r\n{}\n{} (no vsock: x)\n[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n",
            proto::START_MARKER,
            proto::READY_MARKER
        );
        for b in text.as_bytes() {
            sink.write_all(&[*b]).unwrap();
        }
        let ev = String::from_utf8(ev.0.lock().unwrap().clone()).unwrap();
        assert!(ev.contains("\"agent_start\""), "{ev}");
        assert!(ev.contains("\"agent_ready\""), "{ev}");
        assert!(state.panicked.load(Ordering::SeqCst));
        assert_eq!(out.0.lock().unwrap().as_slice(), text.as_bytes());
        assert_eq!(state.tail()[0], "boot");
    }
}
