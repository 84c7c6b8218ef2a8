//! BuildKit's progress, read as a user reads `docker build --progress=plain`.
//!
//! The Engine streams BuildKit's solve status as a series of
//! [`StatusResponse`]s: vertices (one per step, plus BuildKit's internal
//! ones) that start, finish, fail or come from cache; their logs, in
//! chunks; and sub-statuses such as the context transfer. [`Progress`]
//! turns them into ordered lines: `#N <step>` when a step starts, the step's
//! output lines as they are, `#N DONE 1.2s`, `#N CACHED` or
//! `#N ERROR: ...`. Steps of parallel stages can interleave; whenever the
//! output switches to another step, its `#N <step>` line is repeated so
//! every line can be attributed.
//!
//! It also keeps what the caller needs afterwards: the step that failed
//! (the first one, not the siblings BuildKit cancels because of it) and
//! whether the Engine clipped a step's output.

use std::collections::{HashMap, HashSet};

use bollard::moby::buildkit::v1::{StatusResponse, Vertex, VertexLog, VertexStatus};

use super::lines::LineBuffer;
use crate::dashboard::LogType;

/// What BuildKit inside dockerd prints in place of a step's output past its
/// per-step limits (`BUILDKIT_STEP_LOG_MAX_SPEED`, `..._MAX_SIZE`).
const CLIPPED_MARKER: &str = "[output clipped, log limit";

/// The error BuildKit gives the steps it stops because another one failed.
const CANCELED: &str = "context canceled";

/// The line added to a build's log when its output was clipped: it names
/// the fix, since nothing in the build itself can change it.
pub const CLIPPED_NOTICE: &str = "The Docker Engine clipped this build's output (BuildKit's per-step log limit). \
     Run dockerd with BUILDKIT_STEP_LOG_MAX_SIZE=1073741824 and BUILDKIT_STEP_LOG_MAX_SPEED=1073741824 \
     (the drop-in systemd/docker.service.d/deployra-builder.conf of deployra-builder)";

/// A step that failed: its name as the Dockerfile frontend gives it
/// (`[2/3] RUN make`) and BuildKit's error, which ends with the exit code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepFailure {
    pub step: String,
    pub message: String,
}

#[derive(Default)]
struct VertexState {
    number: usize,
    name: String,
    announced: bool,
    finished: bool,
    output: LineBuffer,
}

#[derive(Default)]
pub struct Progress {
    vertices: HashMap<String, VertexState>,
    /// Sub-statuses already shown as done, by vertex and id.
    statuses_done: HashSet<(String, String)>,
    /// The vertex whose output was printed last.
    speaking: Option<String>,
    failure: Option<StepFailure>,
    clipped: bool,
}

/// Lines for the build log, in order.
pub type Lines = Vec<(LogType, String)>;

impl Progress {
    /// Folds one status update in; returns the lines it adds to the log.
    pub fn update(&mut self, status: StatusResponse) -> Lines {
        let mut out = Lines::new();
        for vertex in status.vertexes {
            self.vertex(vertex, &mut out);
        }
        for s in status.statuses {
            self.status(s, &mut out);
        }
        for log in status.logs {
            self.log(log, &mut out);
        }
        for warning in status.warnings {
            let short = String::from_utf8_lossy(&warning.short).into_owned();
            let number = self.state(&warning.vertex).number;
            out.push((LogType::Stderr, format!("#{number} WARN: {short}")));
        }
        out
    }

    /// Flushes what is left of unfinished lines (a build that stopped
    /// mid-line).
    pub fn finish(&mut self) -> Lines {
        let mut out = Lines::new();
        let mut open: Vec<_> = self.vertices.iter_mut().collect();
        open.sort_by_key(|(_, v)| v.number);
        for (_, v) in open {
            if let Some(rest) = v.output.finish() {
                out.push((LogType::Stdout, rest));
            }
        }
        out
    }

    /// The step that made the build fail, if one did.
    pub fn failure(&self) -> Option<&StepFailure> {
        self.failure.as_ref()
    }

    /// Whether the Engine clipped some step's output.
    pub fn clipped(&self) -> bool {
        self.clipped
    }

    fn state(&mut self, digest: &str) -> &mut VertexState {
        let next = self.vertices.len() + 1;
        self.vertices.entry(digest.to_owned()).or_insert_with(|| VertexState {
            number: next,
            ..VertexState::default()
        })
    }

    /// `#N <name>`, once per vertex, and again whenever its output follows
    /// another vertex's.
    fn announce(&mut self, digest: &str, out: &mut Lines) {
        let v = self.state(digest);
        if !v.announced && v.name.is_empty() {
            return;
        }
        if !v.announced || self.speaking.as_deref() != Some(digest) {
            let v = self.state(digest);
            v.announced = true;
            out.push((LogType::Stdout, format!("#{} {}", v.number, v.name)));
            self.speaking = Some(digest.to_owned());
        }
    }

    fn vertex(&mut self, vertex: Vertex, out: &mut Lines) {
        let Vertex {
            digest,
            name,
            cached,
            started,
            completed,
            error,
            ..
        } = vertex;
        let v = self.state(&digest);
        if v.finished {
            return;
        }
        if !name.is_empty() {
            v.name = name;
        }
        if started.is_none() && !cached {
            return;
        }
        let announced = v.announced;
        if !announced {
            self.announce(&digest, out);
        }
        let v = self.state(&digest);
        let number = v.number;
        if cached {
            v.finished = true;
            out.push((LogType::Stdout, format!("#{number} CACHED")));
            return;
        }
        let Some(completed) = completed else { return };
        v.finished = true;
        let rest = v.output.finish();
        let step = v.name.clone();
        if let Some(rest) = rest {
            self.announce(&digest, out);
            out.push((LogType::Stdout, rest));
        }
        if error.is_empty() {
            let seconds = started.map(|s| seconds_between(&s, &completed)).unwrap_or(0.0);
            out.push((LogType::Stdout, format!("#{number} DONE {seconds:.1}s")));
        } else {
            out.push((LogType::Error, format!("#{number} ERROR: {error}")));
            let replaces_cancel = self.failure.as_ref().is_some_and(|f| f.message.ends_with(CANCELED));
            if self.failure.is_none() || (replaces_cancel && !error.ends_with(CANCELED)) {
                self.failure = Some(StepFailure { step, message: error });
            }
        }
    }

    fn status(&mut self, status: VertexStatus, out: &mut Lines) {
        if status.completed.is_none() {
            return;
        }
        if !self.statuses_done.insert((status.vertex.clone(), status.id.clone())) {
            return;
        }
        let number = self.state(&status.vertex).number;
        let amount = match (status.current, status.total) {
            (0, _) => String::new(),
            (current, total) if total > 0 && total != current => {
                format!(" {} / {}", human_bytes(current), human_bytes(total))
            }
            (current, _) => format!(" {}", human_bytes(current)),
        };
        out.push((LogType::Stdout, format!("#{number} {}{amount} done", status.id)));
    }

    fn log(&mut self, log: VertexLog, out: &mut Lines) {
        let mut lines = Vec::new();
        self.state(&log.vertex)
            .output
            .push(&log.msg, &mut |line| lines.push(line));
        if lines.is_empty() {
            return;
        }
        self.announce(&log.vertex, out);
        let kind = if log.stream == 2 {
            LogType::Stderr
        } else {
            LogType::Stdout
        };
        for line in lines {
            if line.contains(CLIPPED_MARKER) && !self.clipped {
                self.clipped = true;
                out.push((kind, line));
                out.push((LogType::Error, CLIPPED_NOTICE.to_owned()));
            } else {
                out.push((kind, line));
            }
        }
    }
}

fn seconds_between(
    start: &bollard_buildkit_proto::google::protobuf::Timestamp,
    end: &bollard_buildkit_proto::google::protobuf::Timestamp,
) -> f64 {
    let nanos = (end.seconds - start.seconds) as f64 * 1e9 + f64::from(end.nanos - start.nanos);
    (nanos / 1e9).max(0.0)
}

/// Sizes as docker's plain progress prints them (`41B`, `1.50kB`, `3.20MB`).
fn human_bytes(n: i64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if n < 1000 {
        return format!("{n}B");
    }
    let mut value = n as f64 / 1000.0;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.2}{}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use bollard_buildkit_proto::google::protobuf::Timestamp;

    use super::*;

    fn at(seconds: i64, nanos: i32) -> Option<Timestamp> {
        Some(Timestamp { seconds, nanos })
    }

    fn vertex(digest: &str, name: &str) -> Vertex {
        Vertex {
            digest: digest.to_owned(),
            name: name.to_owned(),
            ..Vertex::default()
        }
    }

    fn log(digest: &str, text: &str) -> VertexLog {
        VertexLog {
            vertex: digest.to_owned(),
            stream: 1,
            msg: text.as_bytes().to_vec(),
            ..VertexLog::default()
        }
    }

    fn texts(lines: Lines) -> Vec<String> {
        lines.into_iter().map(|(_, t)| t).collect()
    }

    #[test]
    fn a_step_reads_as_name_output_and_timing() {
        let mut p = Progress::default();
        let mut lines = Vec::new();
        let run = "[2/3] RUN echo hi";
        lines.extend(texts(p.update(StatusResponse {
            vertexes: vec![
                Vertex {
                    started: at(10, 0),
                    ..vertex("a", "[1/3] FROM docker.io/local/busybox:latest")
                },
                Vertex {
                    started: at(10, 0),
                    cached: true,
                    ..vertex("a", "[1/3] FROM docker.io/local/busybox:latest")
                },
                Vertex {
                    started: at(10, 0),
                    ..vertex("b", run)
                },
            ],
            ..StatusResponse::default()
        })));
        lines.extend(texts(p.update(StatusResponse {
            logs: vec![log("b", "first\nsec"), log("b", "ond\nunfinished")],
            ..StatusResponse::default()
        })));
        lines.extend(texts(p.update(StatusResponse {
            vertexes: vec![Vertex {
                started: at(10, 0),
                completed: at(11, 250_000_000),
                ..vertex("b", run)
            }],
            ..StatusResponse::default()
        })));
        assert_eq!(
            lines,
            [
                "#1 [1/3] FROM docker.io/local/busybox:latest",
                "#1 CACHED",
                "#2 [2/3] RUN echo hi",
                "first",
                "second",
                "unfinished",
                "#2 DONE 1.2s",
            ]
        );
        assert_eq!(p.failure(), None);
    }

    #[test]
    fn interleaved_output_names_its_step_again() {
        let mut p = Progress::default();
        let started = |d, n| Vertex {
            started: at(1, 0),
            ..vertex(d, n)
        };
        p.update(StatusResponse {
            vertexes: vec![started("a", "[a 1/1] RUN one"), started("b", "[b 1/1] RUN two")],
            ..StatusResponse::default()
        });
        let lines = texts(p.update(StatusResponse {
            logs: vec![log("a", "from a\n"), log("b", "from b\n"), log("a", "a again\n")],
            ..StatusResponse::default()
        }));
        assert_eq!(
            lines,
            [
                "#1 [a 1/1] RUN one",
                "from a",
                "#2 [b 1/1] RUN two",
                "from b",
                "#1 [a 1/1] RUN one",
                "a again"
            ]
        );
    }

    #[test]
    fn the_failing_step_is_kept_not_the_ones_cancelled_with_it() {
        let mut p = Progress::default();
        let failed = |d, n, e: &str| Vertex {
            started: at(1, 0),
            completed: at(2, 0),
            error: e.to_owned(),
            ..vertex(d, n)
        };
        let lines = p.update(StatusResponse {
            vertexes: vec![
                failed("a", "[a 2/2] RUN sleep 9", "context canceled"),
                failed(
                    "b",
                    "[b 2/2] RUN exit 3",
                    "executor failed running [/bin/sh -c exit 3]: exit code: 3",
                ),
            ],
            ..StatusResponse::default()
        });
        assert!(lines
            .iter()
            .any(|(kind, text)| *kind == LogType::Error && text.ends_with("exit code: 3")));
        assert_eq!(
            p.failure(),
            Some(&StepFailure {
                step: "[b 2/2] RUN exit 3".into(),
                message: "executor failed running [/bin/sh -c exit 3]: exit code: 3".into(),
            })
        );
    }

    #[test]
    fn clipped_output_adds_the_fix_once() {
        let mut p = Progress::default();
        p.update(StatusResponse {
            vertexes: vec![Vertex {
                started: at(1, 0),
                ..vertex("a", "[1/1] RUN seq 1 20000")
            }],
            ..StatusResponse::default()
        });
        let marker = "[output clipped, log limit 200KiB/s reached]\n";
        let lines = p.update(StatusResponse {
            logs: vec![log("a", "1\n"), log("a", marker), log("a", marker)],
            ..StatusResponse::default()
        });
        assert!(p.clipped());
        let notices = lines.iter().filter(|(_, t)| t == CLIPPED_NOTICE).count();
        assert_eq!(notices, 1);
    }

    #[test]
    fn finished_transfers_show_their_size_once() {
        let mut p = Progress::default();
        let transfer = VertexStatus {
            id: "transferring context".into(),
            vertex: "ctx".into(),
            current: 41,
            completed: at(1, 0),
            ..VertexStatus::default()
        };
        p.update(StatusResponse {
            vertexes: vec![Vertex {
                started: at(1, 0),
                ..vertex("ctx", "[internal] load build context")
            }],
            ..StatusResponse::default()
        });
        let lines = texts(p.update(StatusResponse {
            statuses: vec![transfer.clone(), transfer],
            ..StatusResponse::default()
        }));
        assert_eq!(lines, ["#1 transferring context 41B done"]);
        assert_eq!(human_bytes(3_200_000), "3.20MB");
    }
}
