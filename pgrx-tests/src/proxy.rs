//! A TCP proxy placed on every replication link so tests can break the
//! network between two particular nodes (cut, stall, cut mid-transfer)
//! without touching the servers or any other link.
//!
//! One listener thread accepts clients; each connection gets two pump threads
//! (one per direction). Every control call takes `&self` and is thread-safe:
//! state lives behind a mutex + condvar, and a registry of live sockets lets
//! `cut()` shut them all down at once, which wakes any pump blocked in I/O.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// Bytes read from a socket per pump iteration.
const CHUNK: usize = 16 * 1024;
/// Upper bound on connecting to the upstream server (a local port).
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Which way bytes flow through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the connecting client to the upstream server (queries, COPY data sent).
    ClientToServer,
    /// From the upstream server back to the client (result rows, batches fetched).
    ServerToClient,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::ClientToServer => 0,
            Direction::ServerToClient => 1,
        }
    }
}

/// What pumps and the listener are currently allowed to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Forward,
    Stall,
    Cut,
    /// The proxy is being dropped: everything stops for good.
    Closed,
}

struct Control {
    mode: Mode,
    /// Remaining bytes allowed in one direction before an automatic cut.
    budget: Option<(Direction, u64)>,
}

/// A pump's permission to forward part of a chunk.
struct Admission {
    len: usize,
    /// The `cut_after` budget is used up once these bytes are written.
    exhausts_budget: bool,
}

/// A live connection's two sockets, kept so `cut()` can shut them down.
struct Pair {
    client: TcpStream,
    server: TcpStream,
}

impl Pair {
    fn shutdown(&self) {
        // Errors only mean the socket is already closed.
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
    }
}

/// State shared by the `Proxy` handle and all of its threads.
struct Shared {
    upstream: SocketAddr,
    control: Mutex<Control>,
    control_changed: Condvar,
    live: Mutex<HashMap<u64, Pair>>,
    connection_threads: Mutex<Vec<JoinHandle<()>>>,
    next_id: AtomicU64,
    forwarded: [AtomicU64; 2],
    accepted: AtomicU64,
}

/// A TCP proxy in front of one upstream address, with fault injection.
///
/// Dropping it closes the listening port and every connection, and joins all
/// of its threads, so nothing outlives the test that created it.
pub struct Proxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
    listener_thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on an ephemeral port of 127.0.0.1 and forwards to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy: bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("proxy: local_addr of listener");
        let shared = Arc::new(Shared {
            upstream,
            control: Mutex::new(Control {
                mode: Mode::Forward,
                budget: None,
            }),
            control_changed: Condvar::new(),
            live: Mutex::new(HashMap::new()),
            connection_threads: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            forwarded: [AtomicU64::new(0), AtomicU64::new(0)],
            accepted: AtomicU64::new(0),
        });
        let listener_shared = Arc::clone(&shared);
        let listener_thread = std::thread::Builder::new()
            .name(format!("proxy-{}", addr.port()))
            .spawn(move || accept_loop(&listener_shared, listener))
            .expect("proxy: spawn listener thread");
        Proxy {
            shared,
            addr,
            listener_thread: Some(listener_thread),
        }
    }

    /// The local port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Drops every open connection at once and refuses new ones (accepted,
    /// then closed immediately) until `restore()`: a hard network partition.
    pub fn cut(&self) {
        self.shared.cut();
    }

    /// Forwards normally again after `cut`, `stall` or `cut_after`.
    /// Connections already dropped stay dropped; clients must reconnect.
    pub fn restore(&self) {
        self.shared.set_mode(Mode::Forward, None);
    }

    /// Keeps connections open but forwards no byte in either direction until
    /// `restore()` (or `cut()`): a network that silently black-holes traffic,
    /// which only timeouts and keepalives can detect.
    pub fn stall(&self) {
        self.shared.set_mode(Mode::Stall, None);
    }

    /// Forwards `n` more bytes from server to client, then acts as `cut()`.
    ///
    /// Server-to-client is the direction that carries fetched batches, so this
    /// breaks a transfer in the middle. Bytes are counted across all of this
    /// proxy's connections; `restore()`, `stall()` or `cut()` cancel the budget.
    pub fn cut_after(&self, n: u64) {
        self.cut_after_bytes(n, Direction::ServerToClient);
    }

    /// Like `cut_after`, counting only bytes flowing in `direction`.
    pub fn cut_after_bytes(&self, n: u64, direction: Direction) {
        if n == 0 {
            self.cut();
        } else {
            self.shared.set_mode(Mode::Forward, Some((direction, n)));
        }
    }

    /// Total bytes forwarded in `direction` since the proxy started. Bytes
    /// are counted as they are handed to the socket, so a peer that received
    /// them always sees them counted (a failed write may overcount a chunk).
    pub fn bytes_forwarded(&self, direction: Direction) -> u64 {
        self.shared.forwarded[direction.index()].load(Ordering::SeqCst)
    }

    /// Connections accepted since the proxy started, including those refused
    /// while cut: it shows whether a client kept trying to reconnect.
    pub fn connections_accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.set_mode(Mode::Closed, None);
        self.shared.shutdown_live();
        // Wake the blocking accept(); it then sees Mode::Closed and returns,
        // dropping the listener so the port refuses connections.
        let woke = TcpStream::connect(self.addr).is_ok();
        if let Some(listener_thread) = self.listener_thread.take() {
            if woke {
                let _ = listener_thread.join();
            }
        }
        let threads = std::mem::take(&mut *lock(&self.shared.connection_threads));
        for thread in threads {
            let _ = thread.join();
        }
    }
}

impl Shared {
    fn control(&self) -> MutexGuard<'_, Control> {
        lock(&self.control)
    }

    fn set_mode(&self, mode: Mode, budget: Option<(Direction, u64)>) {
        let mut control = self.control();
        if control.mode != Mode::Closed {
            control.mode = mode;
            control.budget = budget;
        }
        self.control_changed.notify_all();
    }

    fn cut(&self) {
        self.set_mode(Mode::Cut, None);
        self.shutdown_live();
    }

    fn shutdown_live(&self) {
        for pair in lock(&self.live).values() {
            pair.shutdown();
        }
    }

    /// Registers a connection unless the proxy was cut meanwhile. The mode is
    /// checked under the registry lock, which `cut()` takes after changing the
    /// mode, so no connection can slip past a cut.
    fn register(&self, pair: Pair) -> Option<u64> {
        let mut live = lock(&self.live);
        if matches!(self.control().mode, Mode::Cut | Mode::Closed) {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        live.insert(id, pair);
        Some(id)
    }

    fn deregister(&self, id: u64) {
        if let Some(pair) = lock(&self.live).remove(&id) {
            pair.shutdown();
        }
    }

    /// Blocks while stalled; then says how much of an `n`-byte chunk may be
    /// forwarded, or `None` when the connection must be dropped.
    fn admit(&self, direction: Direction, n: usize) -> Option<Admission> {
        let mut control = self.control();
        while control.mode == Mode::Stall {
            control = self
                .control_changed
                .wait(control)
                .unwrap_or_else(|e| e.into_inner());
        }
        if control.mode != Mode::Forward {
            return None;
        }
        match &mut control.budget {
            Some((budget_direction, remaining)) if *budget_direction == direction => {
                let len = n.min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                *remaining -= len as u64;
                Some(Admission {
                    len,
                    exhausts_budget: *remaining == 0,
                })
            }
            _ => Some(Admission {
                len: n,
                exhausts_budget: false,
            }),
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: TcpListener) {
    for client in listener.incoming() {
        let mode = shared.control().mode;
        if mode == Mode::Closed {
            return;
        }
        let Ok(client) = client else { continue };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if mode == Mode::Cut {
            continue; // dropping `client` closes it: the link refuses service
        }
        let connection_shared = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("proxy-conn".to_string())
            .spawn(move || serve_connection(&connection_shared, client));
        if let Ok(thread) = spawned {
            let mut threads = lock(&shared.connection_threads);
            threads.retain(|t| !t.is_finished());
            threads.push(thread);
        }
    }
}

/// Connects upstream, then pumps both directions until either side closes
/// or the proxy drops the connection.
fn serve_connection(shared: &Arc<Shared>, client: TcpStream) {
    let Ok(server) = TcpStream::connect_timeout(&shared.upstream, UPSTREAM_CONNECT_TIMEOUT) else {
        return; // upstream down: closing the client mimics a refused connection
    };
    // Small protocol messages must not wait for Nagle's algorithm.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(client_registered), Ok(server_registered)) = (client.try_clone(), server.try_clone())
    else {
        return;
    };
    let Some(id) = shared.register(Pair {
        client: client_registered,
        server: server_registered,
    }) else {
        return;
    };
    let (Ok(client_reader), Ok(server_writer)) = (client.try_clone(), server.try_clone()) else {
        shared.deregister(id);
        return;
    };
    let upstream_shared = Arc::clone(shared);
    let upstream_pump = std::thread::Builder::new()
        .name("proxy-pump".to_string())
        .spawn(move || {
            pump(
                &upstream_shared,
                id,
                client_reader,
                server_writer,
                Direction::ClientToServer,
            )
        });
    pump(shared, id, server, client, Direction::ServerToClient);
    if let Ok(upstream_pump) = upstream_pump {
        let _ = upstream_pump.join();
    }
}

/// Copies bytes `from` -> `to` under the proxy's control; when this direction
/// ends for any reason the whole connection is closed, which ends the other.
fn pump(shared: &Shared, id: u64, mut from: TcpStream, mut to: TcpStream, direction: Direction) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let Some(admission) = shared.admit(direction, n) else {
            break;
        };
        // Counted before writing, so a peer that has seen the bytes always
        // finds them in `bytes_forwarded`.
        shared.forwarded[direction.index()].fetch_add(admission.len as u64, Ordering::SeqCst);
        if to.write_all(&buf[..admission.len]).is_err() {
            break;
        }
        if admission.exhausts_budget {
            shared.cut();
            break;
        }
    }
    shared.deregister(id);
}

/// Locks a mutex, ignoring poisoning: a panicking test thread must not stop
/// the proxy from cleaning up.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
