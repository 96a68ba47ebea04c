//! The control socket: `superos-vmm run --api <path>` serves it while the
//! guest runs (and, with `--linger`, after it has stopped);
//! `superos-vmm inspect --api <path> <command>` is its client.
//!
//! # Protocol
//!
//! A Unix stream socket, restricted to its owner (mode 0600) as soon as it
//! is created: whoever can open it can pause the guest and read its memory. The client writes one JSON object per
//! line; the server answers every line with exactly one JSON object on one
//! line, in order. A connection may carry any number of requests.
//!
//! A request names its command in `cmd`; arguments are further fields
//! (integers; addresses are plain JSON integers, as in `run --events json`):
//!
//! ```text
//! {"cmd":"status"}                                  where the guest is (running, paused, finished)
//! {"cmd":"ps"}                                      live processes: counters, quotas, walked counts
//! {"cmd":"maps","pid":3}                            a process's mappings from the page-table walk
//! {"cmd":"frames"}                                  frames per owner
//! {"cmd":"shares"}                                  shared regions and their participants
//! {"cmd":"events","since":0,"wait_ms":1000}        events from position `since` on; waits up to
//!                                                   `wait_ms` (at most 10000) for one if there are none
//! {"cmd":"check"}                                   runs the isolation checker now
//! {"cmd":"translate","pid":3,"vaddr":4194304}      walks one address, level by level
//! {"cmd":"dump","pid":3,"vaddr":4194304,"len":64}  bytes the process maps (at most 65536)
//! {"cmd":"regs","pid":3}                            the user registers it resumes with, and where they are kept
//! {"cmd":"map"}                                     every frame's owner, run-length encoded
//! {"cmd":"pause"}  {"cmd":"resume"}  {"cmd":"quit"}
//! ```
//!
//! The answer is `{"ok":true,"result":{...}}` (the result types are in
//! [`crate::inspect`]: `PsResult`, `MapsResult`, ...; control requests
//! answer a [`ControlResult`]), or `{"ok":false,"error":"<why>"}`. Every
//! query result has an `at` field saying where the guest was when it was
//! read (`at kernel event #12`, `in user code at rip 0x400123 ...`).
//!
//! Queries are answered on a consistent view (see [`crate::control`]): the
//! vCPU is held at a consistent point while the answer is built, then
//! released, unless `pause` holds it until `resume`. `quit` stops the guest
//! if it still runs and ends the VMM (the answer comes first; the
//! connection is then closed).
//!
//! Malformed input is answered, never fatal: a line that is not UTF-8, not
//! JSON, an unknown command, a missing, extra or out-of-range argument each
//! get an error answer and the connection stays open. A line longer than
//! [`MAX_REQUEST`] bytes gets an error answer and the connection is closed.
//! A client that disconnects, stalls, or stops reading only loses its own
//! connection (writes time out after [`WRITE_TIMEOUT`]); at most
//! [`MAX_CLIENTS`] connections are served at once, one with no request for
//! [`IDLE_TIMEOUT`] is closed (with an error answer), and a `pause` whose
//! connection has gone lasts at most [`crate::control::PAUSE_LEASE`] with
//! no request from anyone.

use crate::control::Control;
use crate::inspect;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Longest request line, newline excluded.
pub const MAX_REQUEST: usize = 4096;
/// Longest answer line the client accepts.
pub const MAX_RESPONSE: usize = 256 << 20;
/// Connections served at once.
pub const MAX_CLIENTS: usize = 16;
/// Longest `wait_ms` of an `events` request.
pub const MAX_WAIT_MS: u64 = 10_000;
/// How long the server waits for a client to take an answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often idle connections and the listener look at the stop flag.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// A connection with no complete request for this long is closed (with an
/// error answer), so clients that connect and say nothing cannot hold the
/// [`MAX_CLIENTS`] slots.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// One request (see the module documentation for the wire form).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Where the guest is.
    Status,
    /// Live processes.
    Ps,
    /// A process's mappings.
    Maps {
        /// The process.
        pid: u32,
    },
    /// Frames per owner.
    Frames,
    /// Shared regions.
    Shares,
    /// Kernel events from position `since` on.
    Events {
        /// Events already seen (0: from the first).
        #[serde(default)]
        since: u64,
        /// Wait up to this long (ms) for a new one if there is none.
        #[serde(default)]
        wait_ms: u64,
    },
    /// Run the isolation checker now.
    Check,
    /// Walk one virtual address of a process.
    Translate {
        /// The process.
        pid: u32,
        /// The address.
        vaddr: u64,
    },
    /// Bytes a process maps.
    Dump {
        /// The process.
        pid: u32,
        /// First address.
        vaddr: u64,
        /// How many bytes (1 to [`inspect::MAX_DUMP`]).
        len: u64,
    },
    /// A process's user registers (those it resumes with).
    #[serde(rename = "regs")]
    Registers {
        /// The process.
        pid: u32,
    },
    /// Every frame's owner (for the SVG map).
    Map,
    /// Hold the vCPU at the next consistent point until `resume`.
    Pause,
    /// Let a paused vCPU go.
    Resume,
    /// Stop the guest if it runs and end the VMM.
    Quit,
}

impl Request {
    /// The command's name (`cmd`).
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Ps => "ps",
            Request::Maps { .. } => "maps",
            Request::Frames => "frames",
            Request::Shares => "shares",
            Request::Events { .. } => "events",
            Request::Check => "check",
            Request::Translate { .. } => "translate",
            Request::Dump { .. } => "dump",
            Request::Registers { .. } => "regs",
            Request::Map => "map",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Quit => "quit",
        }
    }

    /// The request as one line of JSON (no newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The answer to `status`, `pause`, `resume` and `quit`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlResult {
    /// `running`, `pausing`, `paused` or `finished` (`snapshot` offline).
    pub state: String,
    /// What happened, in words.
    pub message: String,
    /// Connections the control socket serves (the asking one included).
    #[serde(default)]
    pub clients: u64,
}

/// Parses one request line (without its newline). Never panics.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    let text = std::str::from_utf8(line).map_err(|_| "request is not UTF-8".to_string())?;
    let text = text.trim();
    if text.is_empty() {
        return Err(r#"empty request: send one JSON object per line, e.g. {"cmd":"ps"}"#.into());
    }
    let value: Value = serde_json::from_str(text).map_err(|e| format!("bad request: {e}"))?;
    // Serde lets extra fields through on commands without arguments; an
    // extra field is a mistake the client should hear about.
    if let (Some(object), Some(cmd)) = (value.as_object(), value.get("cmd").and_then(Value::as_str)) {
        let allowed: &[&str] = match cmd {
            "maps" => &["pid"],
            "events" => &["since", "wait_ms"],
            "translate" => &["pid", "vaddr"],
            "dump" => &["pid", "vaddr", "len"],
            "regs" => &["pid"],
            _ => &[],
        };
        if let Some(extra) = object.keys().find(|k| *k != "cmd" && !allowed.contains(&k.as_str())) {
            return Err(format!("bad request: unknown field `{extra}` for `{cmd}`"));
        }
    }
    serde_json::from_value(value).map_err(|e| format!("bad request: {e}"))
}

fn error_line(error: &str) -> String {
    json!({ "ok": false, "error": error }).to_string()
}

fn answer_line(result: Result<Value, String>) -> String {
    match result {
        Ok(result) => json!({ "ok": true, "result": result }).to_string(),
        Err(error) => error_line(&error),
    }
}

/// Answers one request line; true if the connection should then close.
pub fn respond(control: &Control, line: &[u8]) -> (String, bool) {
    respond_for(control, line, None)
}

/// [`respond`] for connection `client` (whose `pause` is released when it
/// has gone and nobody asked anything for [`crate::control::PAUSE_LEASE`]).
pub fn respond_for(control: &Control, line: &[u8], client: Option<u64>) -> (String, bool) {
    control.touch();
    let request = match parse_request(line) {
        Ok(request) => request,
        Err(error) => return (error_line(&error), false),
    };
    let control_result = |outcome: Result<String, String>| {
        outcome.map(|message| {
            let state = control.status().0;
            json!(ControlResult { state, message, clients: control.clients() as u64 })
        })
    };
    let result = match &request {
        Request::Status => {
            let (state, message) = control.status();
            Ok(json!(ControlResult { state, message, clients: control.clients() as u64 }))
        }
        Request::Pause => control_result(control.pause_by(client)),
        Request::Resume => control_result(control.resume()),
        Request::Quit => control_result(control.quit()),
        Request::Events { since, wait_ms } => {
            let result = control.events(*since, Duration::from_millis((*wait_ms).min(MAX_WAIT_MS)));
            serde_json::to_value(result).map_err(|e| format!("internal error: {e}"))
        }
        query => control.query(|machine| inspect::answer(machine, query)).and_then(|answer| answer),
    };
    (answer_line(result), request == Request::Quit)
}

/// How `run` serves the control socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiOptions {
    /// Where the socket is created.
    pub socket: PathBuf,
    /// Hold the vCPU before its first instruction until `resume`.
    pub paused: bool,
    /// Keep serving after the guest has stopped, until `quit`.
    pub linger: bool,
}

/// Binds `path`, replacing a stale socket (one nobody answers on) but
/// never another kind of file or a live socket.
fn bind(path: &Path) -> Result<UnixListener, String> {
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        if !metadata.file_type().is_socket() {
            return Err(format!("{} exists and is not a socket; not replacing it", path.display()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(format!("{} is already served by another process", path.display()));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove the stale socket {}: {e}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot create the control socket {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict the control socket {}: {e}", path.display()))?;
    listener.set_nonblocking(true).map_err(|e| format!("control socket {}: {e}", path.display()))?;
    tracing::info!(socket = %path.display(), "serving the control socket");
    Ok(listener)
}

/// The running server.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `path` and serves it on a thread of its own.
    pub fn start(path: &Path, control: Arc<Control>) -> Result<Server, String> {
        Server::start_with_idle_timeout(path, control, IDLE_TIMEOUT)
    }

    /// [`Server::start`], closing connections idle for `idle`.
    pub fn start_with_idle_timeout(
        path: &Path,
        control: Arc<Control>,
        idle: Duration,
    ) -> Result<Server, String> {
        let listener = bind(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || serve(&listener, &control, &flag, idle))
            .map_err(|e| format!("cannot start the control socket thread: {e}"))?;
        Ok(Server { path: path.to_path_buf(), stop, thread: Some(thread) })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops serving (answers in progress are completed), removes the socket.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// True if `fd` becomes readable within `timeout`.
fn readable(fd: std::os::fd::RawFd, timeout: Duration) -> bool {
    let mut pollfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: `pollfd` is a valid, initialized pollfd that lives for the
    // whole call, and we pass a count of exactly one.
    let ready = unsafe { libc::poll(&mut pollfd, 1, timeout.as_millis() as libc::c_int) };
    ready > 0
}

fn serve(listener: &UnixListener, control: &Control, stop: &AtomicBool, idle: Duration) {
    let mut next_id = 0u64;
    std::thread::scope(|scope| {
        while !stop.load(Ordering::SeqCst) {
            control.expire_pause();
            if !readable(listener.as_raw_fd(), POLL_INTERVAL) {
                continue;
            }
            match listener.accept() {
                Ok((mut stream, _)) => {
                    if control.clients() >= MAX_CLIENTS {
                        tracing::warn!("control socket: connection refused, {MAX_CLIENTS} clients already");
                        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                        let line = error_line(&format!("too many connections (at most {MAX_CLIENTS})"));
                        let _ = writeln!(stream, "{line}");
                        continue;
                    }
                    control.client_connected();
                    next_id += 1;
                    let id = next_id;
                    tracing::debug!(client = id, "control socket: client connected");
                    let spawned = std::thread::Builder::new().name("api-client".into()).spawn_scoped(
                        scope,
                        move || {
                            connection(stream, control, stop, id, idle);
                            control.client_gone(id);
                            control.client_left();
                        },
                    );
                    if spawned.is_err() {
                        control.client_left();
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                // Out of descriptors and the like: do not spin.
                Err(_) => std::thread::sleep(POLL_INTERVAL),
            }
        }
    });
}

/// Serves one connection until the client leaves, `quit`, or the server
/// stops.
fn connection(stream: UnixStream, control: &Control, stop: &AtomicBool, id: u64, idle: Duration) {
    if stream.set_nonblocking(false).is_err()
        || stream.set_read_timeout(Some(POLL_INTERVAL)).is_err()
        || stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err()
    {
        return;
    }
    let mut reader = &stream;
    let mut writer = &stream;
    let mut pending: Vec<u8> = Vec::new();
    let mut buffer = [0u8; 4096];
    let mut last_request = std::time::Instant::now();
    loop {
        while let Some(newline) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=newline).collect();
            let (answer, close) = respond_for(control, &line[..line.len() - 1], Some(id));
            if writeln!(writer, "{answer}").is_err() || close {
                return;
            }
            last_request = std::time::Instant::now();
        }
        if last_request.elapsed() >= idle {
            let _ = writeln!(
                writer,
                "{}",
                error_line(&format!("no request for {} s; closing", idle.as_secs_f64().round()))
            );
            return;
        }
        if pending.len() > MAX_REQUEST {
            let _ = writeln!(
                writer,
                "{}",
                error_line(&format!("request longer than {MAX_REQUEST} bytes; closing"))
            );
            return;
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match reader.read(&mut buffer) {
            Ok(0) => return,
            Ok(n) => pending.extend_from_slice(&buffer[..n]),
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

/// Why a request got no result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientError {
    /// The VMM answered with an error.
    Refused(String),
    /// The socket could not be used, or the answer made no sense.
    Transport(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Refused(why) | ClientError::Transport(why) => f.write_str(why),
        }
    }
}

/// A connection to a VMM's control socket.
#[derive(Debug)]
pub struct Client {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    path: PathBuf,
}

impl Client {
    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|e| {
            ClientError::Transport(format!(
                "cannot connect to {}: {e} (is `superos-vmm run --api {}` running?)",
                path.display(),
                path.display()
            ))
        })?;
        let reader = stream.try_clone().map_err(|e| ClientError::Transport(e.to_string()))?;
        Ok(Client { writer: stream, reader: BufReader::new(reader), path: path.to_path_buf() })
    }

    /// Sends `request` and waits for its answer.
    pub fn request(&mut self, request: &Request) -> Result<Value, ClientError> {
        let gone = |e: std::io::Error| {
            ClientError::Transport(format!("the VMM at {} went away: {e}", self.path.display()))
        };
        let sent = writeln!(self.writer, "{}", request.to_line());
        let mut line = Vec::new();
        let read = (&mut self.reader).take(MAX_RESPONSE as u64 + 1).read_until(b'\n', &mut line);
        // A server that refused the connection (too many clients) or closed
        // it (idle) answered first: say what it said, not "broken pipe".
        if let Err(error) = sent {
            return Err(Self::said(&line).unwrap_or_else(|| gone(error)));
        }
        read.map_err(gone)?;
        if line.last() != Some(&b'\n') {
            return Err(ClientError::Transport(if line.is_empty() {
                format!("the VMM at {} closed the connection", self.path.display())
            } else {
                "the VMM's answer was cut short or too long".to_string()
            }));
        }
        let answer: Value = serde_json::from_slice(&line)
            .map_err(|e| ClientError::Transport(format!("the VMM's answer is not JSON: {e}")))?;
        match (answer.get("ok").and_then(Value::as_bool), answer.get("result"), answer.get("error")) {
            (Some(true), Some(result), _) => Ok(result.clone()),
            (Some(false), _, Some(error)) => {
                Err(ClientError::Refused(error.as_str().unwrap_or("unknown error").to_string()))
            }
            _ => Err(ClientError::Transport(format!("unexpected answer from the VMM: {answer}"))),
        }
    }

    /// The refusal in `line`, if it is one.
    fn said(line: &[u8]) -> Option<ClientError> {
        let answer: Value = serde_json::from_slice(line).ok()?;
        if answer.get("ok")? != false {
            return None;
        }
        Some(ClientError::Refused(answer.get("error")?.as_str()?.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use proptest::prelude::*;

    #[test]
    fn requests_parse_and_round_trip() {
        let cases = [
            (r#"{"cmd":"ps"}"#, Request::Ps),
            (r#" {"cmd":"maps","pid":3} "#, Request::Maps { pid: 3 }),
            (r#"{"cmd":"events"}"#, Request::Events { since: 0, wait_ms: 0 }),
            (
                r#"{"cmd":"dump","pid":1,"vaddr":4194304,"len":16}"#,
                Request::Dump { pid: 1, vaddr: 0x40_0000, len: 16 },
            ),
            ("{\"cmd\":\"quit\"}\r", Request::Quit),
        ];
        for (line, expected) in cases {
            let request = parse_request(line.as_bytes()).unwrap();
            assert_eq!(request, expected);
            assert_eq!(parse_request(request.to_line().as_bytes()).unwrap(), request);
        }
        for (line, needle) in [
            ("", "empty request"),
            ("ps", "bad request"),
            (r#"{"cmd":"reboot"}"#, "unknown variant `reboot`"),
            (r#"{"cmd":"maps"}"#, "missing field `pid`"),
            (r#"{"cmd":"maps","pid":-1}"#, "bad request"),
            (r#"{"cmd":"maps","pid":4294967296}"#, "bad request"),
            (r#"{"cmd":"ps","extra":1}"#, "unknown field"),
            (r#"{"pid":1}"#, "missing field `cmd`"),
            ("[1,2]", "bad request"),
        ] {
            let error = parse_request(line.as_bytes()).unwrap_err();
            assert!(error.contains(needle), "{line:?}: {error}");
        }
        assert_eq!(parse_request(&[0xff, 0xfe]).unwrap_err(), "request is not UTF-8");
        assert!(parse_request(&vec![b' '; MAX_REQUEST + 1]).unwrap_err().contains("longer than"));
    }

    fn finished_control() -> Control {
        let control = Control::new(GuestRam::new(16).unwrap(), vec![(0x10_0000, 16 << 20)], false);
        control.finish(&[], None, None, Vec::new(), "the kernel shut down with status 0".into(), true);
        control
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever a client sends, the answer is one line of JSON saying
        /// `ok` or giving an error; nothing panics.
        #[test]
        fn any_line_gets_one_json_answer(line in proptest::collection::vec(any::<u8>(), 0..300)) {
            let control = finished_control();
            let line: Vec<u8> = line.into_iter().filter(|&b| b != b'\n').collect();
            let (answer, _) = respond(&control, &line);
            prop_assert!(!answer.contains('\n'));
            let value: Value = serde_json::from_str(&answer).unwrap();
            prop_assert!(value["ok"].is_boolean());
            if value["ok"] == false {
                prop_assert!(value["error"].is_string());
            }
        }

        /// Near-miss requests (valid JSON objects with odd commands and
        /// arguments) are answered with errors, not panics.
        #[test]
        fn odd_requests_get_answers(
            cmd in prop_oneof![Just("ps"), Just("maps"), Just("dump"), Just("regs"), Just("translate"), Just("events"), Just("x"), Just("")],
            pid in any::<i64>(),
            vaddr in any::<u64>(),
            len in any::<u64>(),
            extra in any::<bool>(),
        ) {
            let control = finished_control();
            let mut request = json!({ "cmd": cmd, "pid": pid, "vaddr": vaddr, "len": len });
            if extra {
                request["since"] = json!(vaddr);
            }
            let (answer, _) = respond(&control, request.to_string().as_bytes());
            let value: Value = serde_json::from_str(&answer).unwrap();
            prop_assert!(value["ok"].is_boolean());
        }
    }

    #[test]
    fn the_server_answers_garbage_survives_disconnects_and_closes_on_long_lines() {
        let dir = std::env::temp_dir().join(format!("superos-api-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("api.sock");
        let control = Arc::new(finished_control());
        let server = Server::start(&path, control.clone()).unwrap();
        assert!(Server::start(&path, control.clone()).unwrap_err().contains("already served"));

        let mut stream = UnixStream::connect(&path).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let read_answer = |reader: &mut BufReader<UnixStream>| {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            serde_json::from_str::<Value>(&line).unwrap()
        };
        stream.write_all(b"not json\n\xff\xfe\n{\"cmd\":\"status\"}\n").unwrap();
        assert_eq!(read_answer(&mut reader)["ok"], false);
        assert_eq!(read_answer(&mut reader)["error"], "request is not UTF-8");
        let status = read_answer(&mut reader);
        assert_eq!(status["result"]["state"], "finished", "{status}");
        // A request split across writes is still one request.
        stream.write_all(b"{\"cmd\":").unwrap();
        stream.flush().unwrap();
        stream.write_all(b"\"ps\"}\n").unwrap();
        let ps = read_answer(&mut reader);
        assert_eq!(ps["result"]["processes"], json!([]), "{ps}");
        // A client that vanishes mid-request does not hurt the server.
        let mut rude = UnixStream::connect(&path).unwrap();
        rude.write_all(b"{\"cmd\":\"ps\"").unwrap();
        drop(rude);
        // A line that never ends is cut off.
        let mut long = UnixStream::connect(&path).unwrap();
        long.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = long.write_all(&vec![b'x'; MAX_REQUEST * 4]);
        let mut answer = String::new();
        BufReader::new(&long).read_line(&mut answer).unwrap();
        assert!(answer.contains("longer than"), "{answer}");

        let mut client = Client::connect(&path).unwrap();
        assert_eq!(client.request(&Request::Status).unwrap()["state"], "finished");
        match client.request(&Request::Resume) {
            Err(ClientError::Refused(why)) => assert!(why.contains("nothing to resume"), "{why}"),
            other => panic!("{other:?}"),
        }
        let quit = client.request(&Request::Quit).unwrap();
        assert!(quit["message"].as_str().unwrap().contains("quitting"), "{quit}");
        assert!(control.quitting());
        assert!(matches!(client.request(&Request::Status), Err(ClientError::Transport(_))));
        server.shutdown();
        assert!(!path.exists(), "the socket is removed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Polls `condition` for at most 10 s (a bound, not a sleep to
    /// synchronise: it returns as soon as the condition holds).
    fn eventually(condition: impl Fn() -> bool) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if condition() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        condition()
    }

    #[test]
    fn silent_clients_are_timed_out_slots_free_on_disconnect_and_refusals_are_truthful() {
        let dir = std::env::temp_dir().join(format!("superos-api-idle-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("api.sock");
        let control = Arc::new(finished_control());
        let server =
            Server::start_with_idle_timeout(&path, control.clone(), Duration::from_millis(300)).unwrap();
        // Every slot taken by clients that say nothing.
        let silent: Vec<UnixStream> = (0..MAX_CLIENTS).map(|_| UnixStream::connect(&path).unwrap()).collect();
        assert!(eventually(|| control.clients() == MAX_CLIENTS), "{}", control.clients());
        // One more is refused, and told why (not "broken pipe").
        let mut refused = Client::connect(&path).unwrap();
        match refused.request(&Request::Status) {
            Err(ClientError::Refused(why)) => assert!(why.contains("too many connections"), "{why}"),
            other => panic!("{other:?}"),
        }
        // The silent ones are closed after the idle timeout, with a word.
        for stream in &silent {
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut line = String::new();
            BufReader::new(stream).read_line(&mut line).unwrap();
            assert!(line.contains("no request for"), "{line}");
        }
        assert!(eventually(|| control.clients() == 0), "{}", control.clients());
        // Clients that come and go free their slots at once: many more
        // than MAX_CLIENTS in a row are all served.
        for _ in 0..4 * MAX_CLIENTS {
            let mut client = Client::connect(&path).unwrap();
            assert_eq!(client.request(&Request::Status).unwrap()["state"], "finished");
            drop(client);
            assert!(eventually(|| control.clients() == 0), "{}", control.clients());
        }
        drop(silent);
        server.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_pause_outlives_its_client_only_for_the_lease() {
        let dir = std::env::temp_dir().join(format!("superos-api-lease-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("api.sock");
        let control = Arc::new(Control::new(GuestRam::new(16).unwrap(), vec![(0x10_0000, 16 << 20)], false));
        control.set_pause_lease(Duration::from_millis(200));
        // A stand-in vCPU thread that reaches a consistent point every
        // millisecond (the boot point) until told to stop.
        crate::run::install_kick_handler();
        let done = Arc::new(AtomicBool::new(false));
        let vcpu = {
            let (control, done) = (control.clone(), done.clone());
            std::thread::spawn(move || {
                let ram = GuestRam::new(16).unwrap();
                let session = crate::session::Session::new(
                    &ram,
                    std::time::Instant::now(),
                    crate::session::Echo::Quiet,
                    vec![],
                );
                // SAFETY: pthread_self has no preconditions.
                control.vcpu_started(unsafe { libc::pthread_self() });
                while !done.load(Ordering::SeqCst) {
                    control.before_start(&session, Vec::new);
                    std::thread::sleep(Duration::from_millis(1));
                }
                control.vcpu_exited();
            })
        };
        let server = Server::start(&path, control.clone()).unwrap();
        let mut pauser = Client::connect(&path).unwrap();
        assert!(pauser.request(&Request::Pause).unwrap()["message"].as_str().unwrap().starts_with("paused"));
        assert_eq!(control.status().0, "paused");
        // While the pausing client is connected, the pause stays.
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(control.status().0, "paused");
        drop(pauser);
        // Gone, and nobody asks anything: released after the lease.
        assert!(eventually(|| control.status().0 == "running"), "{:?}", control.status());
        // A pause of the library's own (`--paused`) is not a client's.
        control.pause().unwrap();
        std::thread::sleep(Duration::from_millis(400));
        assert!(!control.expire_pause());
        assert_eq!(control.status().0, "paused");
        control.resume().unwrap();
        done.store(true, Ordering::SeqCst);
        vcpu.join().unwrap();
        server.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_stale_sockets_are_replaced() {
        let dir = std::env::temp_dir().join(format!("superos-api-bind-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join("not-a-socket");
        std::fs::write(&file, b"precious").unwrap();
        assert!(bind(&file).unwrap_err().contains("is not a socket"));
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
        let stale = dir.join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        let listener = bind(&stale).unwrap();
        let mode = std::fs::metadata(&stale).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
