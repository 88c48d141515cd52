//! axum (hyper) recipe (docs/servers.md): the inherited socket at fd 3 through `listenfd`,
//! READY=1 through `sd-notify`, a drain on SIGTERM that loses no request.

use std::time::Duration;

use axum::{Router, routing::get};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// How long a connection accepted just before the stop signal may take to send its request.
const NEW_CONNECTION_GRACE: Duration = Duration::from_secs(2);

/// The listener, until the stop signal: then it is dropped (our copy of fd 3 is close()d,
/// the other workers keep accepting) and `accept` never returns again.
struct Draining {
    inner: Option<TcpListener>,
    addr: std::net::SocketAddr,
    stop: watch::Receiver<bool>,
}

impl axum::serve::Listener for Draining {
    type Io = TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (TcpStream, std::net::SocketAddr) {
        loop {
            if *self.stop.borrow() {
                self.inner = None;
            }
            let Some(listener) = &self.inner else { return std::future::pending().await };
            let got = tokio::select! {
                got = listener.accept() => Some(got),
                _ = self.stop.changed() => None,
            };
            match got {
                Some(Ok(conn)) => {
                    // hyper does not set TCP_NODELAY: without it a response written in two parts
                    // waits for the client's delayed ACK.
                    let _ = conn.0.set_nodelay(true);
                    return conn;
                }
                Some(Err(e)) => {
                    eprintln!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                None => {}
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        Ok(self.addr)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let Some(std_listener) = listenfd::ListenFd::from_env().take_tcp_listener(0)? else {
        eprintln!("error: no socket at fd 3 (LISTEN_FDS/LISTEN_PID): run me under herdsman");
        std::process::exit(2);
    };
    // Tokio needs O_NONBLOCK. It is shared by every process holding the socket (the other
    // workers, herdsman, systemd), which is fine when they are all event-loop servers.
    std_listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(std_listener)?;

    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let body = format!(
        r#"{{"server":"axum","pid":{},"worker_id":{},"generation":{}}}"#,
        std::process::id(),
        env("HERDSMAN_WORKER_ID"),
        env("HERDSMAN_GENERATION")
    );
    let app =
        Router::new().route("/", get(move || async move { ([("content-type", "application/json")], body) }));

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        term.recv().await;
        let _ = stop_tx.send(true);
    });
    let mut stop = stop_rx.clone();
    let listener = Draining { addr: listener.local_addr()?, inner: Some(listener), stop: stop_rx };

    if let Ok(dir) = std::env::var("COMPAT_MARK_DIR") {
        // suite only
        let _ = std::fs::write(
            format!("{dir}/loaded-{}-{}", env("HERDSMAN_GENERATION"), env("HERDSMAN_WORKER_ID")),
            "",
        );
    }
    // Connections arriving before `serve` runs wait in the kernel's queue.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
            // hyper's graceful shutdown closes a connection that has not sent a request yet,
            // even one accepted a moment ago whose request is on its way: wait for those first
            // (accepting has stopped), then let axum finish the in-flight requests.
            tokio::time::sleep(NEW_CONNECTION_GRACE).await;
        })
        .await
}
