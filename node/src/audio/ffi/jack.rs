//! A safe JACK client over `libjack.so.0`, loaded at run time.
//!
//! One [`Client`] has at most one audio port, registered when it is activated:
//! [`Client::activate_output`] hands JACK a handler that fills the output port's buffer each
//! period; [`Client::activate_input`] one that reads an input port's buffer. The handler runs
//! on JACK's process thread through an `extern "C"` trampoline that never allocates and never
//! lets a panic cross into C: a handler that panics is not called again, its port is silenced
//! and [`Monitor::panicked`] becomes true. (With `panic = "abort"` a panic aborts the process
//! before the trampoline sees it.)
//!
//! Xruns are counted, the port's playback latency is re-read whenever JACK reorders the graph
//! or recomputes latencies (when the server reports 0 for the port itself, as jackd2 can for
//! a client's port, the largest latency of the ports it is connected to is used instead), and
//! the server shutting down is noted, all in a [`Monitor`] (atomics: readable from any
//! thread, the handler included). Dropping the client deactivates
//! and closes it; the handler is freed only after `jack_client_close` returned, when JACK can
//! no longer call it.
//!
//! The server is the one named in [`Client::open`], or else the one libjack picks by itself:
//! `$JACK_DEFAULT_SERVER`, or `default`. A server is never started (`JackNoStartServer`).
//! libjack (JACK2) keeps one server's shared state per process: every client a process has
//! open at a time must be on the same server (clients of two servers at once crash libjack).

use super::owned_str;
use std::cell::UnsafeCell;
use std::ffi::{CString, c_char, c_int, c_ulong, c_void};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// The shared library this module loads.
pub const LIBRARY: &str = "libjack.so.0";

/// The port type of JACK's native audio ports (`JACK_DEFAULT_AUDIO_TYPE`).
const AUDIO_TYPE: &std::ffi::CStr = c"32 bit float mono audio";

// jack_options_t
const NO_START_SERVER: c_int = 0x01;
const SERVER_NAME: c_int = 0x04;

// jack_latency_callback_mode_t
const PLAYBACK_LATENCY: c_int = 1;

/// `JackPortIsInput`: for [`Client::ports`].
pub const PORT_IS_INPUT: u64 = 0x1;
/// `JackPortIsOutput`: for [`Client::ports`].
pub const PORT_IS_OUTPUT: u64 = 0x2;
/// `JackPortIsPhysical`: for [`Client::ports`].
pub const PORT_IS_PHYSICAL: u64 = 0x4;

/// `EEXIST`: what `jack_connect` returns for a connection that already exists.
const EEXIST: c_int = 17;

type ProcessCallback = unsafe extern "C" fn(u32, *mut c_void) -> c_int;
type ArgCallback = unsafe extern "C" fn(*mut c_void) -> c_int;
type LatencyCallback = unsafe extern "C" fn(c_int, *mut c_void);
type ShutdownCallback = unsafe extern "C" fn(*mut c_void);
type MessageFunction = unsafe extern "C" fn(*const c_char);

/// `jack_latency_range_t` (two `jack_nframes_t`; packed in the header, the same layout).
#[repr(C)]
#[derive(Default)]
struct RawRange {
    min: u32,
    max: u32,
}

dl_api! {
    struct Api {
        required {
            jack_client_open:
                unsafe extern "C" fn(*const c_char, c_int, *mut c_int, ...) -> *mut c_void,
            jack_client_close: unsafe extern "C" fn(*mut c_void) -> c_int,
            jack_get_client_name: unsafe extern "C" fn(*mut c_void) -> *const c_char,
            jack_get_sample_rate: unsafe extern "C" fn(*mut c_void) -> u32,
            jack_get_buffer_size: unsafe extern "C" fn(*mut c_void) -> u32,
            jack_port_register: unsafe extern "C" fn(
                *mut c_void, *const c_char, *const c_char, c_ulong, c_ulong,
            ) -> *mut c_void,
            jack_port_name: unsafe extern "C" fn(*const c_void) -> *const c_char,
            jack_port_get_buffer: unsafe extern "C" fn(*mut c_void, u32) -> *mut c_void,
            jack_port_connected_to: unsafe extern "C" fn(*const c_void, *const c_char) -> c_int,
            jack_port_get_latency_range: unsafe extern "C" fn(*mut c_void, c_int, *mut RawRange),
            jack_port_get_connections: unsafe extern "C" fn(*const c_void) -> *mut *const c_char,
            jack_port_by_name: unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void,
            jack_port_get_all_connections:
                unsafe extern "C" fn(*const c_void, *const c_void) -> *mut *const c_char,
            jack_set_process_callback:
                unsafe extern "C" fn(*mut c_void, Option<ProcessCallback>, *mut c_void) -> c_int,
            jack_set_xrun_callback:
                unsafe extern "C" fn(*mut c_void, Option<ArgCallback>, *mut c_void) -> c_int,
            jack_set_graph_order_callback:
                unsafe extern "C" fn(*mut c_void, Option<ArgCallback>, *mut c_void) -> c_int,
            jack_on_shutdown:
                unsafe extern "C" fn(*mut c_void, Option<ShutdownCallback>, *mut c_void),
            jack_activate: unsafe extern "C" fn(*mut c_void) -> c_int,
            jack_deactivate: unsafe extern "C" fn(*mut c_void) -> c_int,
            jack_get_ports: unsafe extern "C" fn(
                *mut c_void, *const c_char, *const c_char, c_ulong,
            ) -> *mut *const c_char,
            jack_free: unsafe extern "C" fn(*mut c_void),
            jack_connect:
                unsafe extern "C" fn(*mut c_void, *const c_char, *const c_char) -> c_int,
            jack_is_realtime: unsafe extern "C" fn(*mut c_void) -> c_int,
            jack_frame_time: unsafe extern "C" fn(*const c_void) -> u32,
            jack_get_time: unsafe extern "C" fn() -> u64,
        }
        optional {
            jack_set_latency_callback:
                unsafe extern "C" fn(*mut c_void, Option<LatencyCallback>, *mut c_void) -> c_int,
            jack_client_real_time_priority: unsafe extern "C" fn(*mut c_void) -> c_int,
            jack_get_cycle_times: unsafe extern "C" fn(
                *const c_void, *mut u32, *mut u64, *mut u64, *mut f32,
            ) -> c_int,
            jack_set_error_function: unsafe extern "C" fn(Option<MessageFunction>),
            jack_set_info_function: unsafe extern "C" fn(Option<MessageFunction>),
        }
    }
}

static API: OnceLock<Result<Api, JackError>> = OnceLock::new();

/// libjack, opened on first use and kept for the life of the process.
fn api() -> Result<&'static Api, JackError> {
    API.get_or_init(|| load(LIBRARY))
        .as_ref()
        .map_err(Clone::clone)
}

fn load(library: &str) -> Result<Api, JackError> {
    // SAFETY: loading libjack runs its initialisers, which have no preconditions.
    let lib =
        unsafe { libloading::Library::new(library) }.map_err(|e| JackError::NotInstalled {
            library: library.to_string(),
            detail: e.to_string(),
        })?;
    // SAFETY: every type in `Api` is written from JACK's documented C declarations.
    let api =
        unsafe { Api::from_library(lib) }.map_err(|(symbol, detail)| JackError::MissingSymbol {
            library: library.to_string(),
            symbol,
            detail,
        })?;
    // libjack prints its errors (e.g. "Cannot connect to server socket") on stderr; they
    // become debug events instead, and the failure itself a `JackError`.
    // SAFETY: the functions take a callback that stays valid forever.
    unsafe {
        if let Some(f) = api.jack_set_error_function {
            f(Some(jack_error_message));
        }
        if let Some(f) = api.jack_set_info_function {
            f(Some(jack_info_message));
        }
    }
    Ok(api)
}

unsafe extern "C" fn jack_error_message(msg: *const c_char) {
    let _ = catch_unwind(|| {
        // SAFETY: libjack passes a NUL-terminated message valid during the call.
        let msg = unsafe { owned_str(msg) };
        tracing::debug!(target: "voicemesh_node::jack", "libjack: {msg}");
    });
}

unsafe extern "C" fn jack_info_message(msg: *const c_char) {
    let _ = catch_unwind(|| {
        // SAFETY: as above.
        let msg = unsafe { owned_str(msg) };
        tracing::trace!(target: "voicemesh_node::jack", "libjack: {msg}");
    });
}

/// The `jack_status_t` bits of a client open.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Status(pub u32);

impl Status {
    /// `JackFailure`: the operation failed.
    pub const FAILURE: Status = Status(0x01);
    /// `JackInvalidOption`: an option was invalid or unsupported.
    pub const INVALID_OPTION: Status = Status(0x02);
    /// `JackNameNotUnique`: the client name was taken (a unique one was assigned).
    pub const NAME_NOT_UNIQUE: Status = Status(0x04);
    /// `JackServerStarted`: the server was started by this open.
    pub const SERVER_STARTED: Status = Status(0x08);
    /// `JackServerFailed`: no server could be reached.
    pub const SERVER_FAILED: Status = Status(0x10);
    /// `JackServerError`: communication with the server failed.
    pub const SERVER_ERROR: Status = Status(0x20);
    /// `JackNoSuchClient`: no such client.
    pub const NO_SUCH_CLIENT: Status = Status(0x40);
    /// `JackLoadFailure`: an internal client could not be loaded.
    pub const LOAD_FAILURE: Status = Status(0x80);
    /// `JackInitFailure`: an internal client could not be initialised.
    pub const INIT_FAILURE: Status = Status(0x100);
    /// `JackShmFailure`: JACK's shared memory could not be accessed.
    pub const SHM_FAILURE: Status = Status(0x200);
    /// `JackVersionError`: the client's protocol version does not match the server's.
    pub const VERSION_ERROR: Status = Status(0x400);
    /// `JackBackendError`: the server's backend failed.
    pub const BACKEND_ERROR: Status = Status(0x800);
    /// `JackClientZombie`: the client was zombified by the server.
    pub const CLIENT_ZOMBIE: Status = Status(0x1000);

    const NAMES: [(Status, &'static str); 13] = [
        (Self::FAILURE, "failure"),
        (Self::INVALID_OPTION, "invalid option"),
        (Self::NAME_NOT_UNIQUE, "name not unique"),
        (Self::SERVER_STARTED, "server started"),
        (Self::SERVER_FAILED, "server failed"),
        (Self::SERVER_ERROR, "server error"),
        (Self::NO_SUCH_CLIENT, "no such client"),
        (Self::LOAD_FAILURE, "load failure"),
        (Self::INIT_FAILURE, "init failure"),
        (Self::SHM_FAILURE, "shared memory failure"),
        (Self::VERSION_ERROR, "version error"),
        (Self::BACKEND_ERROR, "backend error"),
        (Self::CLIENT_ZOMBIE, "client zombie"),
    ];

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: Status) -> bool {
        self.0 & other.0 == other.0
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (bit, name) in Self::NAMES {
            if self.contains(bit) {
                if !first {
                    f.write_str(", ")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        let unknown = self.0 & !Self::NAMES.iter().fold(0, |a, (b, _)| a | b.0);
        if unknown != 0 {
            if !first {
                f.write_str(", ")?;
            }
            write!(f, "unknown bits {unknown:#x}")?;
        } else if first {
            f.write_str("no status bits")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Status({:#x}: {self})", self.0)
    }
}

/// Why a JACK operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JackError {
    /// libjack could not be loaded.
    #[error(
        "JACK is not installed ({library} not found): install jackd2, or use --audio wav:DIR or \
         null"
    )]
    NotInstalled {
        /// The library asked for ([`LIBRARY`]).
        library: String,
        /// What the dynamic loader said.
        detail: String,
    },
    /// libjack lacks a function this module needs (a very old or odd libjack).
    #[error("{library} has no {symbol} (JACK too old?): {detail}")]
    MissingSymbol {
        /// The library.
        library: String,
        /// The missing function.
        symbol: &'static str,
        /// What the dynamic loader said.
        detail: String,
    },
    /// A name passed to JACK contains a NUL byte.
    #[error("invalid JACK {what} {name:?}: it contains a NUL byte")]
    InvalidName {
        /// What the name is for ("client name", "port name", …).
        what: &'static str,
        /// The name.
        name: String,
    },
    /// No JACK server of that name is running.
    #[error(
        "no JACK server {server:?} running (start jackd or use --audio wav:DIR or null; \
         libjack: {status})"
    )]
    NoServer {
        /// The server asked for (`$JACK_DEFAULT_SERVER` or `default` when none was named).
        server: String,
        /// The status bits of the open.
        status: Status,
    },
    /// The server runs another protocol version than this libjack.
    #[error(
        "the JACK server {server:?} and libjack are of different versions (restart jackd or \
         reinstall jackd2)"
    )]
    VersionMismatch {
        /// The server.
        server: String,
    },
    /// Opening the client failed otherwise.
    #[error("cannot open a JACK client {client:?} on server {server:?}: {status}")]
    OpenFailed {
        /// The client name asked for.
        client: String,
        /// The server.
        server: String,
        /// The status bits of the open.
        status: Status,
    },
    /// A port could not be registered (name taken or too long, or the server refused).
    #[error("cannot register JACK port {port:?} on client {client:?}")]
    PortRegister {
        /// The client.
        client: String,
        /// The port's short name.
        port: String,
    },
    /// A callback could not be installed.
    #[error("cannot set the JACK {what} callback on client {client:?} (error {code})")]
    Callback {
        /// The client.
        client: String,
        /// Which callback.
        what: &'static str,
        /// What libjack returned.
        code: i32,
    },
    /// `jack_activate` failed.
    #[error("cannot activate JACK client {client:?} (error {code})")]
    Activate {
        /// The client.
        client: String,
        /// What libjack returned.
        code: i32,
    },
    /// `jack_connect` failed.
    #[error("cannot connect JACK port {from} to {to} (error {code})")]
    Connect {
        /// The source (output) port.
        from: String,
        /// The destination (input) port.
        to: String,
        /// What libjack returned.
        code: i32,
    },
}

/// A port's latency range in frames (`jack_latency_range_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LatencyRange {
    /// Smallest latency over the paths through the port.
    pub min: u32,
    /// Largest latency over the paths through the port.
    pub max: u32,
}

/// The timing of the current process cycle (`jack_get_cycle_times`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CycleTimes {
    /// The frame time of the cycle's first frame.
    pub current_frames: u32,
    /// When the cycle started, in JACK's microsecond clock ([`Client::time_us`]).
    pub current_usecs: u64,
    /// When the next cycle is expected to start, same clock.
    pub next_usecs: u64,
    /// The filtered period duration in µs.
    pub period_usecs: f32,
}

/// What the callbacks observed; shared by the client and every [`Monitor`].
#[derive(Debug, Default)]
struct Shared {
    cycles: AtomicU64,
    xruns: AtomicU64,
    panicked: AtomicBool,
    shut_down: AtomicBool,
    /// `min << 32 | max` of the port's playback latency.
    playback_latency: AtomicU64,
    cycle_frames: AtomicU32,
    cycle_usecs: AtomicU64,
    next_usecs: AtomicU64,
    period_usecs: AtomicU32,
}

impl Shared {
    fn store_latency(&self, r: RawRange) {
        self.playback_latency.store(
            (u64::from(r.min) << 32) | u64::from(r.max),
            Ordering::Relaxed,
        );
    }
}

/// A cloneable, thread-safe view of what a client's callbacks observed. Every method is one
/// or a few atomic loads: no allocation, no lock, safe to call from the process handler.
#[derive(Debug, Clone)]
pub struct Monitor(Arc<Shared>);

impl Monitor {
    /// Process cycles run so far (the handler's calls, or silenced cycles after a panic).
    pub fn cycles(&self) -> u64 {
        self.0.cycles.load(Ordering::Relaxed)
    }

    /// Xruns the server reported to this client.
    pub fn xruns(&self) -> u64 {
        self.0.xruns.load(Ordering::Relaxed)
    }

    /// Whether the handler panicked (it is not called again; its port outputs silence).
    pub fn panicked(&self) -> bool {
        self.0.panicked.load(Ordering::Relaxed)
    }

    /// Whether the server shut down or kicked this client out.
    pub fn shut_down(&self) -> bool {
        self.0.shut_down.load(Ordering::Relaxed)
    }

    /// The port's playback latency as last read: at activation, after a connection, and
    /// whenever JACK reorders the graph or recomputes latencies.
    pub fn playback_latency(&self) -> LatencyRange {
        let v = self.0.playback_latency.load(Ordering::Relaxed);
        LatencyRange {
            min: (v >> 32) as u32,
            max: v as u32,
        }
    }

    /// The current cycle's times, stored by the trampoline before the handler is called (so
    /// consistent when read from the handler; from another thread the fields may mix two
    /// cycles). All zero if libjack lacks `jack_get_cycle_times`.
    pub fn cycle_times(&self) -> CycleTimes {
        CycleTimes {
            current_frames: self.0.cycle_frames.load(Ordering::Relaxed),
            current_usecs: self.0.cycle_usecs.load(Ordering::Relaxed),
            next_usecs: self.0.next_usecs.load(Ordering::Relaxed),
            period_usecs: f32::from_bits(self.0.period_usecs.load(Ordering::Relaxed)),
        }
    }
}

type OutputHandler = Box<dyn FnMut(u32, &mut [f32]) + Send>;
type InputHandler = Box<dyn FnMut(u32, &[f32]) + Send>;

enum Handler {
    None,
    Output(OutputHandler),
    Input(InputHandler),
}

/// What JACK's callbacks get as their argument. Allocated once per client, freed only after
/// `jack_client_close` returned.
struct CallbackState {
    api: &'static Api,
    client: *mut c_void,
    /// The client's port; written before any callback is installed.
    port: AtomicPtr<c_void>,
    /// Touched only by the process thread once installed (JACK serialises process calls),
    /// and by the owner before installing and after closing.
    handler: UnsafeCell<Handler>,
    shared: Arc<Shared>,
}

impl CallbackState {
    fn read_latency(&self) {
        let port = self.port.load(Ordering::Acquire);
        if port.is_null() {
            return;
        }
        let mut r = RawRange::default();
        // SAFETY: `port` belongs to this open client; `r` is a valid out-pointer.
        unsafe { (self.api.jack_port_get_latency_range)(port, PLAYBACK_LATENCY, &mut r) };
        if r.max == 0 {
            r = self.connected_latency(port);
        }
        self.shared.store_latency(r);
    }

    /// The playback latency range over the ports `port` is connected to (for an output port:
    /// the ports it feeds, e.g. `system:playback_1`), for when the server has not propagated
    /// it to `port` itself. Zero without connections. Allocates (libjack's list of names):
    /// called from the client's own thread and JACK's notification thread, never from the
    /// process callback.
    fn connected_latency(&self, port: *mut c_void) -> RawRange {
        let mut out = RawRange::default();
        let mut first = true;
        // SAFETY: `port` is a registered port of this open client. The result is NULL or a
        // NULL-terminated array of port names, released with jack_free after use; each name
        // is valid until then.
        unsafe {
            let list = (self.api.jack_port_get_connections)(port);
            if list.is_null() {
                return out;
            }
            let mut p = list;
            while !(*p).is_null() {
                let other = (self.api.jack_port_by_name)(self.client, *p);
                if !other.is_null() {
                    let mut r = RawRange::default();
                    (self.api.jack_port_get_latency_range)(other, PLAYBACK_LATENCY, &mut r);
                    out.min = if first { r.min } else { out.min.min(r.min) };
                    out.max = out.max.max(r.max);
                    first = false;
                }
                p = p.add(1);
            }
            (self.api.jack_free)(list.cast());
        }
        out
    }
}

/// The process trampoline. Never allocates, never unwinds.
unsafe extern "C" fn process_trampoline(nframes: u32, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the client's `CallbackState`, alive until after jack_client_close.
    let st = unsafe { &*(arg as *const CallbackState) };
    st.shared.cycles.fetch_add(1, Ordering::Relaxed);
    if let Some(times) = st.api.jack_get_cycle_times {
        let (mut frames, mut now, mut next, mut period) = (0u32, 0u64, 0u64, 0f32);
        // SAFETY: called on the process thread of this client, with valid out-pointers.
        if unsafe { times(st.client, &mut frames, &mut now, &mut next, &mut period) } == 0 {
            let s = &st.shared;
            s.cycle_frames.store(frames, Ordering::Relaxed);
            s.cycle_usecs.store(now, Ordering::Relaxed);
            s.next_usecs.store(next, Ordering::Relaxed);
            s.period_usecs.store(period.to_bits(), Ordering::Relaxed);
        }
    }
    let port = st.port.load(Ordering::Acquire);
    if port.is_null() {
        return 0;
    }
    // SAFETY: a registered port of this client, inside its process callback.
    let buf = unsafe { (st.api.jack_port_get_buffer)(port, nframes) } as *mut f32;
    if buf.is_null() {
        return 0;
    }
    // SAFETY: only the process thread touches the handler while the client is active.
    let handler = unsafe { &mut *st.handler.get() };
    let len = nframes as usize;
    let panicked = st.shared.panicked.load(Ordering::Relaxed);
    match handler {
        Handler::Output(h) => {
            // SAFETY: JACK gives an output port a buffer of `nframes` f32, aligned, owned by
            // this client for the duration of the cycle.
            let out = unsafe { std::slice::from_raw_parts_mut(buf, len) };
            if panicked
                || catch_unwind(AssertUnwindSafe(|| h(nframes, &mut *out))).is_err_and(|payload| {
                    // Dropping a payload may itself panic: leak it (once per client).
                    std::mem::forget(payload);
                    true
                })
            {
                st.shared.panicked.store(true, Ordering::Relaxed);
                out.fill(0.0);
            }
        }
        Handler::Input(h) => {
            if !panicked {
                // SAFETY: an input port's buffer holds `nframes` f32 for this cycle; it may
                // be another port's buffer, hence read-only.
                let inp = unsafe { std::slice::from_raw_parts(buf as *const f32, len) };
                if let Err(payload) = catch_unwind(AssertUnwindSafe(|| h(nframes, inp))) {
                    std::mem::forget(payload);
                    st.shared.panicked.store(true, Ordering::Relaxed);
                }
            }
        }
        Handler::None => {}
    }
    0
}

unsafe extern "C" fn xrun_trampoline(arg: *mut c_void) -> c_int {
    // SAFETY: as in `process_trampoline`.
    let st = unsafe { &*(arg as *const CallbackState) };
    st.shared.xruns.fetch_add(1, Ordering::Relaxed);
    0
}

unsafe extern "C" fn graph_order_trampoline(arg: *mut c_void) -> c_int {
    // SAFETY: as in `process_trampoline`.
    let st = unsafe { &*(arg as *const CallbackState) };
    st.read_latency();
    0
}

unsafe extern "C" fn latency_trampoline(mode: c_int, arg: *mut c_void) {
    if mode == PLAYBACK_LATENCY {
        // SAFETY: as in `process_trampoline`.
        let st = unsafe { &*(arg as *const CallbackState) };
        st.read_latency();
    }
}

unsafe extern "C" fn shutdown_trampoline(arg: *mut c_void) {
    // SAFETY: as in `process_trampoline`.
    let st = unsafe { &*(arg as *const CallbackState) };
    st.shared.shut_down.store(true, Ordering::Relaxed);
}

fn cstring(what: &'static str, name: &str) -> Result<CString, JackError> {
    CString::new(name).map_err(|_| JackError::InvalidName {
        what,
        name: name.to_string(),
    })
}

/// An open JACK client, not yet active. Closed on drop.
pub struct Client {
    api: &'static Api,
    client: NonNull<c_void>,
    name: String,
    /// `Box::into_raw` of the callbacks' argument; freed in `Drop` after the close.
    state: NonNull<CallbackState>,
    shared: Arc<Shared>,
}

// SAFETY: libjack's client functions may be called from any thread; the callback state is
// only shared with JACK's threads through atomics and the process-thread-only handler.
unsafe impl Send for Client {}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Opens a client named `name` (JACK makes it unique if taken: see [`Client::name`]) on
    /// the server `server`, or, when `None`, the one libjack picks (`$JACK_DEFAULT_SERVER`,
    /// else `default`). Never starts a server.
    pub fn open(name: &str, server: Option<&str>) -> Result<Client, JackError> {
        let api = api()?;
        let c_name = cstring("client name", name)?;
        let c_server = server.map(|s| cstring("server name", s)).transpose()?;
        let mut status: c_int = 0;
        // SAFETY: valid NUL-terminated strings and status pointer; with JackServerName the one
        // variadic argument is the server name, a `const char *`.
        let raw = unsafe {
            match &c_server {
                Some(s) => (api.jack_client_open)(
                    c_name.as_ptr(),
                    NO_START_SERVER | SERVER_NAME,
                    &mut status,
                    s.as_ptr(),
                ),
                None => (api.jack_client_open)(c_name.as_ptr(), NO_START_SERVER, &mut status),
            }
        };
        let status = Status(status as u32);
        let Some(client) = NonNull::new(raw) else {
            let server = server.map(str::to_string).unwrap_or_else(|| {
                std::env::var("JACK_DEFAULT_SERVER").unwrap_or_else(|_| "default".into())
            });
            return Err(if status.contains(Status::VERSION_ERROR) {
                JackError::VersionMismatch { server }
            } else if status.contains(Status::SERVER_FAILED) {
                JackError::NoServer { server, status }
            } else {
                JackError::OpenFailed {
                    client: name.to_string(),
                    server,
                    status,
                }
            });
        };
        // SAFETY: an open client; the name string is owned by libjack and copied at once.
        let name = unsafe { owned_str((api.jack_get_client_name)(client.as_ptr())) };
        let shared = Arc::new(Shared::default());
        let state = Box::new(CallbackState {
            api,
            client: client.as_ptr(),
            port: AtomicPtr::new(ptr::null_mut()),
            handler: UnsafeCell::new(Handler::None),
            shared: shared.clone(),
        });
        Ok(Client {
            api,
            client,
            name,
            // SAFETY: `Box::into_raw` is never null.
            state: unsafe { NonNull::new_unchecked(Box::into_raw(state)) },
            shared,
        })
    }

    /// The client's actual name (JACK may have made the requested one unique).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server's sample rate in Hz.
    pub fn sample_rate(&self) -> u32 {
        // SAFETY: an open client.
        unsafe { (self.api.jack_get_sample_rate)(self.client.as_ptr()) }
    }

    /// The server's period (frames per process cycle).
    pub fn buffer_size(&self) -> u32 {
        // SAFETY: an open client.
        unsafe { (self.api.jack_get_buffer_size)(self.client.as_ptr()) }
    }

    /// Whether the server runs in real-time mode.
    pub fn is_realtime(&self) -> bool {
        // SAFETY: an open client.
        unsafe { (self.api.jack_is_realtime)(self.client.as_ptr()) != 0 }
    }

    /// The real-time priority of this client's process thread, if JACK runs it real-time
    /// (`None` as well if libjack lacks `jack_client_real_time_priority`).
    pub fn real_time_priority(&self) -> Option<i32> {
        let f = self.api.jack_client_real_time_priority?;
        // SAFETY: an open client.
        let p = unsafe { f(self.client.as_ptr()) };
        (p >= 0 && self.is_realtime()).then_some(p)
    }

    /// JACK's estimate of the current frame time (any thread).
    pub fn frame_time(&self) -> u32 {
        // SAFETY: an open client.
        unsafe { (self.api.jack_frame_time)(self.client.as_ptr()) }
    }

    /// JACK's microsecond clock, the one of [`CycleTimes`].
    pub fn time_us(&self) -> u64 {
        // SAFETY: no arguments; the library is loaded.
        unsafe { (self.api.jack_get_time)() }
    }

    /// A view of what this client's callbacks observe (usable inside the handler).
    pub fn monitor(&self) -> Monitor {
        Monitor(self.shared.clone())
    }

    /// Full names of the audio ports whose names match the regular expression `name_pattern`
    /// (empty: all) and that have every flag in `flags` ([`PORT_IS_INPUT`], …; 0: any).
    pub fn ports(&self, name_pattern: &str, flags: u64) -> Result<Vec<String>, JackError> {
        let pattern = cstring("port name pattern", name_pattern)?;
        // SAFETY: an open client and valid strings; the result is NULL or a NULL-terminated
        // array of strings, released with jack_free once copied.
        unsafe {
            let list = (self.api.jack_get_ports)(
                self.client.as_ptr(),
                pattern.as_ptr(),
                AUDIO_TYPE.as_ptr(),
                flags as c_ulong,
            );
            if list.is_null() {
                return Ok(Vec::new());
            }
            let mut names = Vec::new();
            let mut p = list;
            while !(*p).is_null() {
                names.push(owned_str(*p));
                p = p.add(1);
            }
            (self.api.jack_free)(list.cast());
            Ok(names)
        }
    }

    /// The playback latency of any port by its full name (`None`: no such port).
    pub fn port_playback_latency(&self, port: &str) -> Option<LatencyRange> {
        let name = CString::new(port).ok()?;
        // SAFETY: an open client and a valid string; `r` is a valid out-pointer.
        unsafe {
            let p = (self.api.jack_port_by_name)(self.client.as_ptr(), name.as_ptr());
            if p.is_null() {
                return None;
            }
            let mut r = RawRange::default();
            (self.api.jack_port_get_latency_range)(p, PLAYBACK_LATENCY, &mut r);
            Some(LatencyRange {
                min: r.min,
                max: r.max,
            })
        }
    }

    /// Full names of the ports the port `port` (any client's, full name) is connected to;
    /// empty when it has none or does not exist.
    pub fn port_connections(&self, port: &str) -> Vec<String> {
        let Ok(name) = CString::new(port) else {
            return Vec::new();
        };
        let mut names = Vec::new();
        // SAFETY: an open client and a valid string; the result is NULL or a NULL-terminated
        // array of strings, released with jack_free once copied.
        unsafe {
            let p = (self.api.jack_port_by_name)(self.client.as_ptr(), name.as_ptr());
            if p.is_null() {
                return names;
            }
            let list = (self.api.jack_port_get_all_connections)(self.client.as_ptr(), p);
            if list.is_null() {
                return names;
            }
            let mut q = list;
            while !(*q).is_null() {
                names.push(owned_str(*q));
                q = q.add(1);
            }
            (self.api.jack_free)(list.cast());
        }
        names
    }

    /// Connects the output port `from` to the input port `to` (full names). Already
    /// connected is success.
    pub fn connect(&self, from: &str, to: &str) -> Result<(), JackError> {
        let f = cstring("port name", from)?;
        let t = cstring("port name", to)?;
        // SAFETY: an open client and valid strings.
        let code = unsafe { (self.api.jack_connect)(self.client.as_ptr(), f.as_ptr(), t.as_ptr()) };
        // SAFETY: the state lives as long as `self`.
        unsafe { self.state.as_ref() }.read_latency();
        match code {
            0 | EEXIST => Ok(()),
            code => Err(JackError::Connect {
                from: from.to_string(),
                to: to.to_string(),
                code,
            }),
        }
    }

    /// Registers the output port `port` and activates the client: from then on `handler`
    /// fills the port's buffer every cycle (`nframes`, the buffer of `nframes` samples). It
    /// runs on JACK's real-time thread: it must not allocate, lock or block.
    pub fn activate_output<F>(self, port: &str, handler: F) -> Result<ActiveClient, JackError>
    where
        F: FnMut(u32, &mut [f32]) + Send + 'static,
    {
        self.activate(port, PORT_IS_OUTPUT, Handler::Output(Box::new(handler)))
    }

    /// Registers the input port `port` and activates the client: from then on `handler`
    /// reads the port's buffer every cycle. Real-time rules as for
    /// [`activate_output`](Client::activate_output).
    pub fn activate_input<F>(self, port: &str, handler: F) -> Result<ActiveClient, JackError>
    where
        F: FnMut(u32, &[f32]) + Send + 'static,
    {
        self.activate(port, PORT_IS_INPUT, Handler::Input(Box::new(handler)))
    }

    fn activate(self, port: &str, flags: u64, handler: Handler) -> Result<ActiveClient, JackError> {
        let c_port = cstring("port name", port)?;
        let client = self.client.as_ptr();
        let api = self.api;
        // SAFETY: an open client, valid strings.
        let raw_port = unsafe {
            (api.jack_port_register)(
                client,
                c_port.as_ptr(),
                AUDIO_TYPE.as_ptr(),
                flags as c_ulong,
                0,
            )
        };
        if raw_port.is_null() {
            return Err(JackError::PortRegister {
                client: self.name.clone(),
                port: port.to_string(),
            });
        }
        // SAFETY: a registered port; its name is copied at once.
        let port_name = unsafe { owned_str((api.jack_port_name)(raw_port)) };
        let arg = self.state.as_ptr();
        // SAFETY: no callback is installed yet, so nothing else reads the state.
        unsafe {
            (*arg).port.store(raw_port, Ordering::Release);
            *(*arg).handler.get() = handler;
        }
        let arg = arg.cast::<c_void>();
        let check = |what: &'static str, code: c_int| {
            if code == 0 {
                Ok(())
            } else {
                Err(JackError::Callback {
                    client: self.name.clone(),
                    what,
                    code,
                })
            }
        };
        // SAFETY: an inactive open client; the trampolines match JACK's callback types and
        // `arg` outlives the client (freed after jack_client_close).
        unsafe {
            check(
                "process",
                (api.jack_set_process_callback)(client, Some(process_trampoline), arg),
            )?;
            check(
                "xrun",
                (api.jack_set_xrun_callback)(client, Some(xrun_trampoline), arg),
            )?;
            check(
                "graph order",
                (api.jack_set_graph_order_callback)(client, Some(graph_order_trampoline), arg),
            )?;
            if let Some(set_latency) = api.jack_set_latency_callback {
                check(
                    "latency",
                    set_latency(client, Some(latency_trampoline), arg),
                )?;
            }
            (api.jack_on_shutdown)(client, Some(shutdown_trampoline), arg);
        }
        // SAFETY: an open client with its callbacks set.
        let code = unsafe { (api.jack_activate)(client) };
        if code != 0 {
            return Err(JackError::Activate {
                client: self.name.clone(),
                code,
            });
        }
        // SAFETY: the state lives as long as the client.
        unsafe { self.state.as_ref() }.read_latency();
        Ok(ActiveClient {
            client: self,
            port_name,
            port: raw_port,
        })
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // SAFETY: the client is open (closed only here). After jack_client_close returns no
        // callback runs any more, so the state (and the handler in it) can be freed.
        unsafe {
            (self.api.jack_client_close)(self.client.as_ptr());
            drop(Box::from_raw(self.state.as_ptr()));
        }
    }
}

/// An active JACK client with its one port. Derefs to [`Client`]; deactivated and closed on
/// drop, after which the handler is dropped.
pub struct ActiveClient {
    client: Client,
    port_name: String,
    port: *mut c_void,
}

// SAFETY: as for `Client`; the port handle is only passed to libjack.
unsafe impl Send for ActiveClient {}

impl fmt::Debug for ActiveClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActiveClient")
            .field("name", &self.client.name)
            .field("port", &self.port_name)
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for ActiveClient {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl ActiveClient {
    /// The port's full name (`client:port`).
    pub fn port_name(&self) -> &str {
        &self.port_name
    }

    /// Whether the port is connected to the port `other` (full name).
    pub fn is_connected_to(&self, other: &str) -> bool {
        let Ok(other) = CString::new(other) else {
            return false;
        };
        // SAFETY: a registered port of an open client, a valid string.
        unsafe { (self.client.api.jack_port_connected_to)(self.port, other.as_ptr()) != 0 }
    }

    /// Connects the (output) port to `system:playback_1` and `system:playback_2`, each if it
    /// exists; returns the ports it is now connected to.
    pub fn connect_system_playback(&self) -> Result<Vec<String>, JackError> {
        let present = self.ports("^system:playback_[12]$", PORT_IS_INPUT)?;
        let mut connected = Vec::new();
        for dest in ["system:playback_1", "system:playback_2"] {
            if present.iter().any(|p| p == dest) {
                self.connect(&self.port_name, dest)?;
                connected.push(dest.to_string());
            }
        }
        Ok(connected)
    }

    /// The port's playback latency, read now (and stored for [`Monitor::playback_latency`]).
    pub fn playback_latency(&self) -> LatencyRange {
        // SAFETY: the state lives as long as the client.
        unsafe { self.client.state.as_ref() }.read_latency();
        self.client.monitor().playback_latency()
    }
}

impl Drop for ActiveClient {
    fn drop(&mut self) {
        // SAFETY: an active client; `Client::drop` closes it and frees the handler next.
        unsafe { (self.client.api.jack_deactivate)(self.client.client.as_ptr()) };
    }
}

// ---------------------------------------------------------------------------------------------
// MIDI input (used by the coordinator's `--jack-midi`): its own symbol table and process
// callback, so the audio client above is untouched.
// ---------------------------------------------------------------------------------------------

/// The port type of JACK's MIDI ports (`JACK_DEFAULT_MIDI_TYPE`).
const MIDI_TYPE: &std::ffi::CStr = c"8 bit raw midi";

/// `jack_midi_event_t`.
#[repr(C)]
struct RawMidi {
    time: u32,
    size: usize,
    buffer: *mut u8,
}

dl_api! {
    struct MidiApi {
        required {
            jack_midi_get_event_count: unsafe extern "C" fn(*mut c_void) -> u32,
            jack_midi_event_get: unsafe extern "C" fn(*mut RawMidi, *mut c_void, u32) -> c_int,
            jack_last_frame_time: unsafe extern "C" fn(*const c_void) -> u32,
            jack_frames_to_time: unsafe extern "C" fn(*const c_void, u32) -> u64,
        }
        optional {}
    }
}

static MIDI_API: OnceLock<Result<MidiApi, JackError>> = OnceLock::new();

fn midi_api() -> Result<&'static MidiApi, JackError> {
    MIDI_API
        .get_or_init(|| {
            // SAFETY: as in `load`.
            let lib = unsafe { libloading::Library::new(LIBRARY) }.map_err(|e| {
                JackError::NotInstalled {
                    library: LIBRARY.to_string(),
                    detail: e.to_string(),
                }
            })?;
            // SAFETY: the types are JACK's documented `jack/midiport.h` declarations.
            unsafe { MidiApi::from_library(lib) }.map_err(|(symbol, detail)| {
                JackError::MissingSymbol {
                    library: LIBRARY.to_string(),
                    symbol,
                    detail,
                }
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// One MIDI event from a [`MidiInput`]: the first three bytes and the full length (SysEx and
/// other long messages are longer than the bytes kept).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MidiInEvent {
    /// When the event's frame plays, on JACK's microsecond clock ([`Client::time_us`]).
    pub time_us: u64,
    /// The message's length in bytes.
    pub len: usize,
    /// Its first bytes (as many as `len`, at most 3).
    pub bytes: [u8; 3],
}

struct MidiState {
    api: &'static Api,
    midi: &'static MidiApi,
    client: *mut c_void,
    port: *mut c_void,
    queue: UnsafeCell<rtrb::Producer<MidiInEvent>>,
    dropped: AtomicU64,
}

unsafe extern "C" fn midi_trampoline(nframes: u32, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `MidiState` installed with this callback, alive until after
    // jack_client_close; only this (process) thread touches the producer.
    let st = unsafe { &*(arg as *const MidiState) };
    // SAFETY: an active client's registered port, inside the process callback.
    let buf = unsafe { (st.api.jack_port_get_buffer)(st.port, nframes) };
    if buf.is_null() {
        return 0;
    }
    // SAFETY: as above; the producer is ours alone.
    let (n, first, q) = unsafe {
        (
            (st.midi.jack_midi_get_event_count)(buf),
            (st.midi.jack_last_frame_time)(st.client),
            &mut *st.queue.get(),
        )
    };
    for i in 0..n {
        let mut ev = RawMidi {
            time: 0,
            size: 0,
            buffer: ptr::null_mut(),
        };
        // SAFETY: a valid out-pointer and port buffer; the event's bytes live for the cycle.
        if unsafe { (st.midi.jack_midi_event_get)(&mut ev, buf, i) } != 0 || ev.buffer.is_null() {
            continue;
        }
        let mut bytes = [0u8; 3];
        let keep = ev.size.min(3);
        // SAFETY: `buffer` holds `size` bytes; `keep` ≤ size.
        bytes[..keep].copy_from_slice(unsafe { std::slice::from_raw_parts(ev.buffer, keep) });
        // SAFETY: an active client.
        let time_us =
            unsafe { (st.midi.jack_frames_to_time)(st.client, first.wrapping_add(ev.time)) };
        let e = MidiInEvent {
            time_us,
            len: ev.size,
            bytes,
        };
        if q.push(e).is_err() {
            st.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
    0
}

/// A JACK client with one MIDI input port, active from [`MidiInput::start`] until dropped.
/// Events are queued (wait-free, at most `capacity`; more are counted in
/// [`MidiInput::dropped`]) for a non-real-time thread to [`MidiInput::pop`].
pub struct MidiInput {
    client: Option<Client>,
    state: NonNull<MidiState>,
    queue: rtrb::Consumer<MidiInEvent>,
    port_name: String,
}

// SAFETY: as for `Client`; the state is shared with JACK's thread only through the queue and
// an atomic.
unsafe impl Send for MidiInput {}

impl fmt::Debug for MidiInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MidiInput")
            .field("port", &self.port_name)
            .finish_non_exhaustive()
    }
}

impl MidiInput {
    /// Registers the MIDI input port `port` on `client` and activates it.
    pub fn start(client: Client, port: &str, capacity: usize) -> Result<MidiInput, JackError> {
        let midi = midi_api()?;
        let api = client.api;
        let raw_client = client.client.as_ptr();
        let c_port = cstring("port name", port)?;
        // SAFETY: an open client, valid strings.
        let raw_port = unsafe {
            (api.jack_port_register)(
                raw_client,
                c_port.as_ptr(),
                MIDI_TYPE.as_ptr(),
                PORT_IS_INPUT as c_ulong,
                0,
            )
        };
        if raw_port.is_null() {
            return Err(JackError::PortRegister {
                client: client.name.clone(),
                port: port.to_string(),
            });
        }
        // SAFETY: a registered port; its name is copied at once.
        let port_name = unsafe { owned_str((api.jack_port_name)(raw_port)) };
        let (producer, queue) = rtrb::RingBuffer::new(capacity.max(1));
        let state = Box::new(MidiState {
            api,
            midi,
            client: raw_client,
            port: raw_port,
            queue: UnsafeCell::new(producer),
            dropped: AtomicU64::new(0),
        });
        // SAFETY: `Box::into_raw` is never null.
        let state = unsafe { NonNull::new_unchecked(Box::into_raw(state)) };
        let input = MidiInput {
            client: Some(client),
            state,
            queue,
            port_name,
        };
        let name = || {
            input
                .client
                .as_ref()
                .map(|c| c.name.clone())
                .unwrap_or_default()
        };
        // SAFETY: an open, inactive client; the state outlives it (freed in Drop after close).
        unsafe {
            if (api.jack_set_process_callback)(
                raw_client,
                Some(midi_trampoline),
                state.as_ptr().cast(),
            ) != 0
            {
                return Err(JackError::Callback {
                    client: name(),
                    what: "process",
                    code: -1,
                });
            }
            let code = (api.jack_activate)(raw_client);
            if code != 0 {
                return Err(JackError::Activate {
                    client: name(),
                    code,
                });
            }
        }
        Ok(input)
    }

    /// The port's full name (`client:port`), to connect a MIDI source to.
    pub fn port_name(&self) -> &str {
        &self.port_name
    }

    /// The client, for its clock ([`Client::time_us`]) and connections.
    pub fn client(&self) -> &Client {
        self.client.as_ref().expect("present until drop")
    }

    /// The next queued event.
    pub fn pop(&mut self) -> Option<MidiInEvent> {
        self.queue.pop().ok()
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        // SAFETY: the state lives until drop.
        unsafe { self.state.as_ref() }
            .dropped
            .load(Ordering::Relaxed)
    }

    /// Connects the JACK MIDI output port `source` (full name) to this input.
    pub fn connect_from(&self, source: &str) -> Result<(), JackError> {
        self.client().connect(source, &self.port_name)
    }
}

impl Drop for MidiInput {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            // SAFETY: an active client; closed by `Client::drop` right after.
            unsafe { (c.api.jack_deactivate)(c.client.as_ptr()) };
            drop(c);
        }
        // SAFETY: the client is closed: no callback can run any more.
        unsafe { drop(Box::from_raw(self.state.as_ptr())) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_a_clear_error() {
        let e = load("libjack-voicemesh-absent.so.0").unwrap_err();
        assert!(matches!(e, JackError::NotInstalled { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "JACK is not installed (libjack-voicemesh-absent.so.0 not found): install jackd2, \
             or use --audio wav:DIR or null"
        );
    }

    #[test]
    fn status_names_its_bits() {
        assert_eq!(Status(0x11).to_string(), "failure, server failed");
        assert_eq!(Status(0).to_string(), "no status bits");
        assert_eq!(Status(0x4000).to_string(), "unknown bits 0x4000");
        assert!(Status(0x31).contains(Status::SERVER_ERROR));
    }
}
