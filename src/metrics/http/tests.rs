use super::wire::*;
use super::*;

#[test]
fn requests() {
    let r =
        parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text\r\n\r\n");
    assert_eq!(
        r,
        Ok(Request { head: false, accept: Some("application/openmetrics-text".into()), probe: None })
    );
    assert_eq!(parse_request(b"GET /ready HTTP/1.1\r\n\r\n").unwrap().probe, Some(Probe::Ready));
    assert_eq!(parse_request(b"HEAD /live?x HTTP/1.0\r\n\r\n").unwrap().probe, Some(Probe::Live));
    assert_eq!(parse_request(b"GET /other HTTP/1.1\r\n\r\n"), Err(404));
    assert_eq!(parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"), Err(405));
    assert_eq!(parse_request(b"garbage\r\n\r\n"), Err(400));
    assert!(parse_request(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n").unwrap().head);
}

/// Issue 22 item 5: a scrape whose page cannot be built (here: the supervisor's queue is
/// full and never drained) is answered `503` at the deadline, not held forever.
#[test]
fn a_scrape_that_cannot_get_its_page_is_answered_503_at_the_deadline() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let p = std::env::temp_dir().join(format!("herdsman-deadline-{}.sock", std::process::id()));
    let addr = ListenAddr::Unix(p.clone());
    let bound = bind(&addr).unwrap();
    let (tx, _rx) = mpsc::channel(1);
    // The queue is full: the scrape's snapshot request can never be sent.
    tx.try_send(Control::Status { reply: tokio::sync::oneshot::channel().0 }).unwrap();
    let answer = rt.block_on(async {
        serve(&bound, Metrics::disabled(), tx).unwrap();
        let mut c = tokio::net::UnixStream::connect(&p).await.unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
        let mut all = Vec::new();
        let read = c.read_to_end(&mut all);
        tokio::time::timeout(Duration::from_secs(60), read).await.map(|_| all)
    });
    let answer = String::from_utf8_lossy(&answer.expect("an answer, not a wait without end")).to_string();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
}

/// A head or chunk-size line that is not text ends the search: later reads are not
/// scanned again from the start (each re-validated up to 4 MiB on the loop before).
#[test]
fn a_head_or_chunk_size_that_is_not_text_is_looked_at_once() {
    let cases: [&[u8]; 2] = [
        b"HTTP/1.1 200 OK\r\nX: \xff\r\n\r\nbody",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\xff\r\nabc",
    ];
    for whole in cases {
        let mut end = ResponseEnd::default();
        assert_eq!(end.feed(whole), None);
        assert!(matches!(end.state, EndState::Close), "{}", String::from_utf8_lossy(whole));
        let mut more = whole.to_vec();
        more.extend_from_slice(&[b'x'; 64]);
        assert_eq!(end.feed(&more), None);
        assert_eq!(complete_response(&more), None);
    }
}

#[test]
fn the_end_of_a_response_fed_a_byte_at_a_time_is_where_the_whole_says() {
    let cases: [&[u8]; 5] = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcEXTRA",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\nafter",
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc",
        b"no head at all\r\n",
    ];
    for whole in cases {
        for step in [1, 2, 3, 5, whole.len()] {
            let mut end = ResponseEnd::default();
            let mut got = None;
            let mut at = 0;
            while got.is_none() && at < whole.len() {
                at = (at + step).min(whole.len());
                got = end.feed(&whole[..at]);
            }
            // Fed as it came, the end is found as soon as the bytes are there.
            assert_eq!(got, complete_response(whole), "{} by {step}", String::from_utf8_lossy(whole));
            if let Some(n) = got {
                assert_eq!(complete_response(&whole[..n]), Some(n));
            }
        }
    }
}

#[test]
fn responses_with_length_chunks_or_close() {
    let a = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcEXTRA";
    assert_eq!(complete_response(a), Some(a.len() - 5));
    assert_eq!(response_body(a).unwrap(), b"abc");
    let c = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
    assert_eq!(complete_response(c), Some(c.len()));
    assert_eq!(response_body(c).unwrap(), b"abcde");
    let h = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it";
    assert_eq!(complete_response(h), None);
    assert_eq!(response_body(h).unwrap(), b"all of it");
    assert!(response_body(b"HTTP/1.1 500 Oops\r\n\r\n").is_err());
    assert!(response_body(b"nonsense").is_err());
}
