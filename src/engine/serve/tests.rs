//! The serving loops over in-memory streams (`tokio::io::duplex`), with handlers written
//! here; time is paused, so deadlines pass at once and exactly.

use super::*;
use crate::engine::handler::{Handler, NoLog, PendingReply};
use std::net::SocketAddr;
use tokio::io::{duplex, DuplexStream};
use tokio::sync::Notify;

/// Echoes the request as a JSON string; "fail" fails; "wait" waits for `go`.
struct TestHandler {
    go: Arc<Notify>,
}

impl Handler for TestHandler {
    fn respond(&self, request: Bytes, _caller: &Arc<Caller>) -> PendingReply {
        let go = self.go.clone();
        Box::pin(async move {
            match &request[..] {
                b"fail" => Err(Failure::new(FailureKind::Handler, "ValueError: no")),
                b"panic" => panic!("a bug in a handler"),
                b"wait" => {
                    go.notified().await;
                    Ok(Bytes::from_static(b"\"waited\""))
                }
                other => Ok(Bytes::from(format!(
                    "\"{}\"",
                    String::from_utf8_lossy(other)
                ))),
            }
        })
    }
}

fn service(protocol: Protocol, limits: Limits) -> (Arc<Service>, Arc<Notify>) {
    let go = Arc::new(Notify::new());
    let handler = TestHandler { go: go.clone() };
    let service = Service::new(
        protocol,
        limits,
        Responder::Handler(Arc::new(handler)),
        Arc::new(NoLog),
    );
    (Arc::new(service), go)
}

fn limits() -> Limits {
    Limits {
        timeout: Some(Duration::from_secs(1)),
        idle_timeout: None,
        max_frame: 1024,
        max_buffered: DEFAULT_MAX_BUFFERED,
        max_connections_per_address: None,
        max_unsent: DEFAULT_MAX_UNSENT,
    }
}

fn peer() -> Address {
    Address::Inet(SocketAddr::from(([127, 0, 0, 1], 1)))
}

/// Serves one in-memory connection in a task; returns the client's end and the task.
fn connect(
    service: &Arc<Service>,
    stop: &CancellationToken,
) -> (DuplexStream, tokio::task::JoinHandle<()>) {
    let (client, server) = duplex(64 * 1024);
    let service = service.clone();
    let stop = stop.clone();
    let task = tokio::spawn(async move {
        let caller = Arc::new(Caller {
            address: peer(),
            certificate: None,
            proxy_address: None,
        });
        service.serve_connection(server, caller, stop, None).await
    });
    (client, task)
}

fn frames(payloads: &[&[u8]]) -> Vec<u8> {
    payloads
        .iter()
        .flat_map(|p| codec::encode_frame(p).unwrap().to_vec())
        .collect()
}

async fn read_reply<S: AsyncRead + Unpin>(client: &mut S, input: &mut BytesMut) -> codec::Frame {
    codec::read_frame(client, input, &mut FrameCodec::replies(1 << 20))
        .await
        .unwrap()
        .expect("a reply")
}

#[tokio::test(start_paused = true)]
async fn classic_replies_raw_json_then_closes() {
    let (service, _) = service(Protocol::Classic, limits());
    let (mut client, task) = connect(&service, &CancellationToken::new());
    client.write_all(&frames(&[b"hi"])).await.unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"\"hi\"");
    task.await.unwrap();
    assert_eq!(service.stats.requests(), 1);
}

#[tokio::test(start_paused = true)]
async fn classic_failure_closes_without_a_reply() {
    let (service, _) = service(Protocol::Classic, limits());
    let (mut client, task) = connect(&service, &CancellationToken::new());
    client.write_all(&frames(&[b"fail"])).await.unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).await.unwrap();
    assert!(reply.is_empty());
    task.await.unwrap();
    assert_eq!(service.stats.errors.handler.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn framed_answers_a_pipelined_batch_in_order_with_error_replies() {
    let (service, _) = service(Protocol::Framed, limits());
    let (mut client, _task) = connect(&service, &CancellationToken::new());
    client
        .write_all(&frames(&[b"one", b"fail", b"three"]))
        .await
        .unwrap();
    let mut input = BytesMut::new();
    let first = read_reply(&mut client, &mut input).await;
    let failed = read_reply(&mut client, &mut input).await;
    let third = read_reply(&mut client, &mut input).await;
    assert_eq!(
        (&first.payload[..], first.is_error),
        (&b"\"one\""[..], false)
    );
    assert!(failed.is_error);
    let error: serde_json::Value = serde_json::from_slice(&failed.payload).unwrap();
    assert_eq!(error["error"], "handler");
    assert_eq!(error["message"], "ValueError: no");
    assert_eq!(&third.payload[..], b"\"three\"");
    assert_eq!(service.stats.requests(), 3);
}

#[tokio::test(start_paused = true)]
async fn more_than_a_batch_of_buffered_requests_all_get_replies() {
    let (service, _) = service(Protocol::Framed, limits());
    let (client, _task) = connect(&service, &CancellationToken::new());
    let (mut read, mut write) = tokio::io::split(client);
    let count = MAX_BATCH * 2 + 3;
    let payloads: Vec<Vec<u8>> = (0..count).map(|i| i.to_string().into_bytes()).collect();
    let refs: Vec<&[u8]> = payloads.iter().map(|p| &p[..]).collect();
    let all = frames(&refs);
    let writer = tokio::spawn(async move { write.write_all(&all).await.unwrap() });
    let mut input = BytesMut::new();
    let mut codec = FrameCodec::replies(1024);
    for i in 0..count {
        let reply = codec::read_frame(&mut read, &mut input, &mut codec)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply.payload, format!("\"{i}\""));
    }
    writer.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_oversized_header_gets_an_error_reply_and_the_connection_closes() {
    let (service, _) = service(Protocol::Framed, limits());
    let (mut client, task) = connect(&service, &CancellationToken::new());
    client.write_all(&2000u32.to_be_bytes()).await.unwrap();
    let mut input = BytesMut::new();
    let reply = read_reply(&mut client, &mut input).await;
    assert!(reply.is_error);
    let error: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(error["error"], "frame_too_large");
    task.await.unwrap();
    assert_eq!(
        service.stats.errors.frame_too_large.load(Ordering::Relaxed),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_that_stalls_mid_frame_is_dropped_at_its_deadline() {
    let (service, _) = service(Protocol::Framed, limits());
    let (mut client, task) = connect(&service, &CancellationToken::new());
    let whole = frames(&[b"slow"]);
    client.write_all(&whole[..5]).await.unwrap();
    // Paused time runs ahead to the one-second deadline as soon as everything waits.
    task.await.unwrap();
    assert_eq!(service.stats.errors.timeout.load(Ordering::Relaxed), 1);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_is_closed_after_idle_timeout() {
    let limits = Limits {
        idle_timeout: Some(Duration::from_secs(5)),
        ..limits()
    };
    let (service, _) = service(Protocol::Framed, limits);
    let (mut client, task) = connect(&service, &CancellationToken::new());
    client.write_all(&frames(&[b"once"])).await.unwrap();
    let mut input = BytesMut::new();
    read_reply(&mut client, &mut input).await;
    task.await.unwrap();
    assert_eq!(service.stats.idle_closed.load(Ordering::Relaxed), 1);
    assert_eq!(service.stats.active(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_idle_limit_counts_from_the_last_request_not_from_the_first() {
    let limits = Limits {
        idle_timeout: Some(Duration::from_secs(5)),
        ..limits()
    };
    let (service, _) = service(Protocol::Framed, limits);
    let (mut client, task) = connect(&service, &CancellationToken::new());
    let mut input = BytesMut::new();
    let began = Instant::now();
    // Twelve seconds of requests 3 s apart: never 5 s idle, so never closed.
    for n in 0..5 {
        if n > 0 {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        client.write_all(&frames(&[b"again"])).await.unwrap();
        assert_eq!(
            &read_reply(&mut client, &mut input).await.payload[..],
            b"\"again\""
        );
    }
    assert_eq!(service.stats.idle_closed.load(Ordering::Relaxed), 0);
    let last = Instant::now();
    assert_eq!(last - began, Duration::from_secs(12));
    // Closed exactly one idle limit after the last request, saying so first.
    assert!(read_reply(&mut client, &mut input).await.is_closing());
    assert_eq!(Instant::now() - last, Duration::from_secs(5));
    drop(client);
    task.await.unwrap();
    assert_eq!(service.stats.idle_closed.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn a_request_that_meets_the_goodbye_is_not_handled_and_the_client_is_told() {
    let (service, _) = service(Protocol::Framed, limits());
    let stop = CancellationToken::new();
    let (mut client, task) = connect(&service, &stop);
    client.write_all(&frames(&[b"first"])).await.unwrap();
    let mut input = BytesMut::new();
    assert_eq!(
        &read_reply(&mut client, &mut input).await.payload[..],
        b"\"first\""
    );
    stop.cancel();
    let goodbye = read_reply(&mut client, &mut input).await;
    assert!(goodbye.is_closing(), "{goodbye:?}");
    // Sent after the goodbye: read and dropped, never answered, and no reset.
    client.write_all(&frames(&[b"late"])).await.unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    task.await.unwrap();
    assert_eq!(service.stats.requests(), 1);
}

#[tokio::test(start_paused = true)]
async fn stop_ends_a_connection_waiting_between_requests_but_not_an_exchange() {
    let (service, go) = service(Protocol::Framed, limits());
    let stop = CancellationToken::new();
    let (mut client, task) = connect(&service, &stop);
    client.write_all(&frames(&[b"wait"])).await.unwrap();
    tokio::task::yield_now().await;
    stop.cancel();
    go.notify_one();
    let mut input = BytesMut::new();
    // The exchange in progress still gets its reply; then the connection ends.
    assert_eq!(
        &read_reply(&mut client, &mut input).await.payload[..],
        b"\"waited\""
    );
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_fixed_reply_needs_no_handler() {
    let service = Arc::new(Service::new(
        Protocol::Classic,
        limits(),
        Responder::Fixed(Bytes::from_static(SEED_REPLY)),
        Arc::new(NoLog),
    ));
    let (mut client, _task) = connect(&service, &CancellationToken::new());
    client
        .write_all(&frames(&[b"msg from client"]))
        .await
        .unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, SEED_REPLY);
}

/// A framed test server on a real loopback socket, started on the shared runtime, and a
/// runtime for the test's clients.
fn real_server() -> (tokio::runtime::Runtime, Server, SocketAddr, Arc<Notify>) {
    let (service, go) = service(Protocol::Framed, limits());
    let service = Arc::try_unwrap(service).ok().expect("only owner");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let endpoint = Endpoint::Tcp {
        host: "127.0.0.1".into(),
        port: 0,
    };
    let server = rt
        .block_on(Server::bind(&endpoint, 16, service, 8))
        .unwrap();
    let Address::Inet(addr) = server.address().clone() else {
        panic!("a TCP address")
    };
    server.start().unwrap();
    (rt, server, addr, go)
}

#[test]
fn a_panic_while_serving_ends_that_connection_only() {
    let (rt, server, addr, _go) = real_server();
    rt.block_on(async {
        let mut doomed = tokio::net::TcpStream::connect(addr).await.unwrap();
        doomed.write_all(&frames(&[b"panic"])).await.unwrap();
        let mut nothing = Vec::new();
        let _ = doomed.read_to_end(&mut nothing).await;
        assert!(nothing.is_empty());
        let mut fine = tokio::net::TcpStream::connect(addr).await.unwrap();
        fine.write_all(&frames(&[b"ok"])).await.unwrap();
        let mut input = BytesMut::new();
        assert_eq!(
            &read_reply(&mut fine, &mut input).await.payload[..],
            b"\"ok\""
        );
        // The doomed connection closed as the panic unwound; it is counted just after, on
        // the server's thread.
        let internal = &server.service().stats.errors.internal;
        tokio::time::timeout(Duration::from_secs(10), async {
            while internal.load(Ordering::Relaxed) == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the panic is counted");
    });
    let stats = &server.service().stats;
    assert_eq!(stats.errors.internal.load(Ordering::Relaxed), 1);
    assert!(server.failure().is_none());
    rt.block_on(server.begin_shutdown(Some(Duration::from_secs(1))));
}

#[test]
fn shutdown_drops_an_exchange_stuck_past_its_grace() {
    let (rt, server, addr, _go) = real_server();
    rt.block_on(async {
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client.write_all(&frames(&[b"wait"])).await.unwrap();
        while server.service().stats.requests() == 0 {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The handler never finishes; shutdown with a short grace still does.
        server.begin_shutdown(Some(Duration::from_millis(20))).await;
        assert!(server.is_finished());
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        assert_eq!(server.service().stats.active(), 0);
    });
    assert_eq!(server.start(), Err(CannotStart::Stopped));
}

mod fuzz {
    //! Random requests, cut into random pieces, and random bytes: the serving loop never
    //! panics or hangs, and answers every request with its own reply, in order.

    use super::*;
    use proptest::prelude::*;

    fn paused_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    }

    /// Writes `bytes` in pieces cut at `cuts` (offsets, any order), yielding between them.
    async fn write_in_pieces(client: &mut DuplexStream, bytes: &[u8], cuts: &[usize]) {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.push(bytes.len());
        cuts.sort_unstable();
        let mut at = 0;
        for cut in cuts {
            if client.write_all(&bytes[at..cut]).await.is_err() {
                return; // the server closed (e.g. after refusing a header)
            }
            at = cut;
            tokio::task::yield_now().await;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

        #[test]
        fn every_request_gets_its_own_reply_in_order(
            payloads in proptest::collection::vec(
                prop_oneof![
                    Just(b"fail".to_vec()),
                    proptest::collection::vec(b'a'..=b'z', 0..300),
                ],
                1..40,
            ),
            cuts in proptest::collection::vec(any::<usize>(), 0..20),
            max_unsent in 1usize..4096,
        ) {
            let limits = Limits { max_unsent, max_frame: 1024, ..limits() };
            paused_runtime().block_on(async {
                let (service, _go) = service(Protocol::Framed, limits);
                let (mut client, task) = connect(&service, &CancellationToken::new());
                let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
                let bytes = frames(&refs);
                let (mut read, mut write) = tokio::io::split(&mut client);
                let writing = async {
                    let mut pieces = Vec::new();
                    let mut at = 0;
                    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
                    cuts.push(bytes.len());
                    cuts.sort_unstable();
                    for cut in cuts {
                        pieces.push(bytes[at..cut].to_vec());
                        at = cut;
                    }
                    for piece in pieces {
                        write.write_all(&piece).await.unwrap();
                        tokio::task::yield_now().await;
                    }
                    write.shutdown().await.unwrap();
                };
                let reading = async {
                    let mut input = BytesMut::new();
                    let mut codec = FrameCodec::replies(1 << 20);
                    let mut replies = Vec::new();
                    for _ in 0..payloads.len() {
                        let reply = codec::read_frame(&mut read, &mut input, &mut codec)
                            .await
                            .unwrap()
                            .expect("a reply for every request");
                        replies.push(reply);
                    }
                    replies
                };
                let ((), replies) = tokio::join!(writing, reading);
                for (payload, reply) in payloads.iter().zip(&replies) {
                    if payload == b"fail" {
                        assert!(reply.is_error);
                    } else {
                        assert!(!reply.is_error);
                        let expected = format!("\"{}\"", String::from_utf8_lossy(payload));
                        assert_eq!(&reply.payload[..], expected.as_bytes());
                    }
                }
                task.await.unwrap();
            });
        }

        #[test]
        fn random_bytes_never_panic_or_hang(
            bytes in proptest::collection::vec(any::<u8>(), 0..2000),
            cuts in proptest::collection::vec(any::<usize>(), 0..10),
            classic in any::<bool>(),
        ) {
            let protocol = if classic { Protocol::Classic } else { Protocol::Framed };
            paused_runtime().block_on(async {
                let (service, _go) = service(protocol, limits());
                let (mut client, task) = connect(&service, &CancellationToken::new());
                write_in_pieces(&mut client, &bytes, &cuts).await;
                let _ = client.shutdown().await;
                let mut rest = Vec::new();
                let _ = client.read_to_end(&mut rest).await;
                // Ends: by the peer's close, an error, or the request deadline (paused time
                // runs ahead to it), never by hanging.
                task.await.unwrap();
            });
        }

        #[test]
        fn the_codec_reads_frames_however_they_are_cut(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..100), 0..20),
            cuts in proptest::collection::vec(any::<usize>(), 0..20),
        ) {
            let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            let bytes = frames(&refs);
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.push(bytes.len());
            cuts.sort_unstable();
            let mut codec = FrameCodec::new(1024);
            let mut input = BytesMut::new();
            let mut decoded = Vec::new();
            let mut at = 0;
            for cut in cuts {
                input.extend_from_slice(&bytes[at..cut]);
                at = cut;
                while let Some(frame) = codec.decode(&mut input).unwrap() {
                    decoded.push(frame.payload.to_vec());
                }
            }
            prop_assert_eq!(decoded, payloads);
        }
    }
}
