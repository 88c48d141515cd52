//! Minimal herdsman worker in Rust (std + `listenfd` + `sd-notify`).
//!
//! herdsman hands every worker the same listening socket at fd 3 (systemd
//! socket-activation protocol), so all workers accept from one kernel queue.
//!
//! ```text
//! cargo build --release --example rust_worker
//! herdsman run --listen 127.0.0.1:8080 -w 4 --ready notify -- target/release/examples/rust_worker
//! ```
//!
//! Graceful drain is left out for brevity: on SIGTERM the process simply exits.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::{env, process, thread};

fn main() {
    let listener: TcpListener = match listenfd::ListenFd::from_env().take_tcp_listener(0) {
        Ok(Some(listener)) => listener,
        Ok(None) => {
            eprintln!("error: no listening socket at fd 3: run me under herdsman");
            process::exit(2);
        }
        Err(err) => {
            eprintln!("error: fd 3 is not a TCP listener: {err}");
            process::exit(2);
        }
    };
    let id = env::var("HERDSMAN_WORKER_ID").unwrap_or_else(|_| "?".into());
    let generation = env::var("HERDSMAN_GENERATION").unwrap_or_else(|_| "?".into());
    let greeting = format!("hello from worker {id} (pid {}, generation {generation})\n", process::id());

    println!("worker {id} (pid {}) serving on fd 3", process::id());
    // No-op when NOTIFY_SOCKET is unset (e.g. with `--ready alive:1s`).
    if let Err(err) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        eprintln!("warning: sd_notify failed: {err}");
    }

    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let greeting = greeting.clone();
                thread::spawn(move || {
                    if let Err(err) = handle(stream, &greeting) {
                        eprintln!("connection error: {err}");
                    }
                });
            }
            // O_NONBLOCK is shared by every process holding the listener and
            // another worker may have set it: never change it, just back off.
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(err) => eprintln!("accept error: {err}"),
        }
    }
}

/// Reads one request head (body ignored) and answers with `Connection: close`.
fn handle(stream: TcpStream, greeting: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
            break;
        }
    }
    let mut out = &stream;
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{greeting}",
        greeting.len()
    )?;
    out.flush()
}
