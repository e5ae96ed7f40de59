//! framesock's benchmark helpers, with no Python and no JSON in them:
//!
//! - `server`: the native ceiling, a tokio server speaking framesock's wire (classic or framed)
//!   that answers every request with fixed bytes;
//! - `load`: the load generator, C connections doing exchanges as fast as replies come back,
//!   printing one JSON line of results;
//! - `bigframes`: one connection sending large frames, printing the throughput.
//!
//! Arguments are `--name value` pairs; see `usage()`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A load connection: plain TCP or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A TLS client trusting the CA in `path` (PEM), or None without `--tls-ca`.
fn tls_connector(opts: &HashMap<String, String>) -> Option<tokio_rustls::TlsConnector> {
    use rustls::pki_types::pem::PemObject;
    let path = opts.get("tls-ca")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(path).expect("read --tls-ca") {
        roots.add(cert.expect("a PEM certificate")).expect("a CA certificate");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// A connection to the server, under TLS with a connector.
/// Whether each connection starts with a PROXY protocol v2 header (`--proxy-header 1`), as a
/// balancer's `send-proxy-v2` writes it: client 192.0.2.1:40000, server 127.0.0.1.
static PROXY_HEADER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn proxy_v2_header(port: u16) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    header.extend_from_slice(&[192, 0, 2, 1, 127, 0, 0, 1]);
    header.extend_from_slice(&40000u16.to_be_bytes());
    header.extend_from_slice(&port.to_be_bytes());
    header
}

async fn open(port: u16, tls: &Option<tokio_rustls::TlsConnector>) -> std::io::Result<Box<dyn Io>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    if PROXY_HEADER.load(std::sync::atomic::Ordering::Relaxed) {
        stream.write_all(&proxy_v2_header(port)).await?;
    }
    match tls {
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
            Ok(Box::new(tls.connect(name, stream).await?))
        }
        None => Ok(Box::new(stream)),
    }
}

const SEED_REPLY: &[u8] = br#"{"key": "id", "val": 123}"#;

fn usage() -> ! {
    eprintln!(
        "usage: fsbench server --protocol classic|framed [--reply-size N | --reply-file PATH]\n       \
         fsbench load --port P --protocol classic|framed [--connections C] [--seconds S] [--payload N]\n       \
                      [--tls-ca PEM] [--reconnect 1] [--proxy-header 1]\n       \
                      (TLS to 'localhost'; a new connection per exchange; a PROXY v2 header first)\n       \
         fsbench bigframes --port P [--size BYTES] [--count K]\n       \
         (every command takes --threads 1 for a single-threaded runtime)"
    );
    std::process::exit(2)
}

fn options(args: &[String]) -> HashMap<String, String> {
    args.chunks(2)
        .map(|pair| match pair {
            [name, value] if name.starts_with("--") => (name[2..].to_owned(), value.clone()),
            _ => usage(),
        })
        .collect()
}

fn number(opts: &HashMap<String, String>, name: &str, default: u64) -> u64 {
    opts.get(name).map_or(default, |v| v.parse().unwrap_or_else(|_| usage()))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else { usage() };
    let opts = options(rest);
    // --threads 1 runs everything on this thread: the fastest for a single connection.
    let runtime = match opts.get("threads").map(String::as_str) {
        Some("1") => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        _ => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
    }
    .expect("runtime");
    match command.as_str() {
        "server" => runtime.block_on(server(&opts)),
        "load" => runtime.block_on(load(&opts)),
        "bigframes" => runtime.block_on(bigframes(&opts)),
        _ => usage(),
    }
}

/// A JSON string of `size` bytes (quotes included), or the seed's reply.
fn reply_bytes(size: u64) -> Vec<u8> {
    if size < 2 {
        return SEED_REPLY.to_vec();
    }
    let mut reply = vec![b'x'; size as usize];
    reply[0] = b'"';
    reply[size as usize - 1] = b'"';
    reply
}

async fn server(opts: &HashMap<String, String>) {
    let framed = opts.get("protocol").map(String::as_str) == Some("framed");
    let reply = match opts.get("reply-file") {
        Some(path) => std::fs::read(path).expect("reply file"),
        None => reply_bytes(number(opts, "reply-size", 0)),
    };
    let listener = TcpListener::bind(("127.0.0.1", number(opts, "port", 0) as u16)).await.expect("bind");
    println!("PORT {}", listener.local_addr().expect("address").port());
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        stream.set_nodelay(true).ok();
        let reply = reply.clone();
        tokio::spawn(async move {
            let _ = if framed { serve_framed(&mut stream, &reply).await } else { serve_classic(&mut stream, &reply).await };
        });
    }
}

async fn serve_classic(stream: &mut TcpStream, reply: &[u8]) -> std::io::Result<()> {
    let len = stream.read_u32().await? as usize;
    let mut payload = vec![0; len];
    stream.read_exact(&mut payload).await?;
    stream.write_all(reply).await?;
    stream.shutdown().await
}

/// Answers every request buffered, then writes the replies together (as framesock does).
async fn serve_framed(stream: &mut TcpStream, reply: &[u8]) -> std::io::Result<()> {
    let mut framed_reply = (reply.len() as u32).to_be_bytes().to_vec();
    framed_reply.extend_from_slice(reply);
    let mut input: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut start = 0;
    let mut output = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        while input.len() - start >= 4 {
            let len = u32::from_be_bytes(input[start..start + 4].try_into().unwrap()) as usize;
            if input.len() - start < 4 + len {
                input.reserve(4 + len);
                break;
            }
            start += 4 + len;
            output.extend_from_slice(&framed_reply);
        }
        if !output.is_empty() {
            stream.write_all(&output).await?;
            output.clear();
        }
        input.drain(..start);
        start = 0;
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        input.extend_from_slice(&chunk[..n]);
    }
}

async fn load(opts: &HashMap<String, String>) {
    let port = number(opts, "port", 0) as u16;
    let framed = opts.get("protocol").map(String::as_str) == Some("framed");
    let connections = number(opts, "connections", 32);
    let seconds: f64 = opts.get("seconds").map_or(3.0, |v| v.parse().unwrap_or_else(|_| usage()));
    let warmup = Duration::from_secs_f64(number(opts, "warmup-ms", 300) as f64 / 1000.0);
    let payload = b"msg from client".repeat(number(opts, "payload", 15) as usize / 15 + 1);
    let payload = payload[..number(opts, "payload", 15) as usize].to_vec();
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);

    let tls = tls_connector(opts);
    let reconnect = number(opts, "reconnect", 0) == 1;
    PROXY_HEADER.store(number(opts, "proxy-header", 0) == 1, std::sync::atomic::Ordering::Relaxed);
    let begin = Instant::now() + warmup;
    let end = begin + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let frame = frame.clone();
        let tls = tls.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies: Vec<u32> = Vec::with_capacity(1 << 16);
            let mut errors = 0u64;
            let mut reply = Vec::with_capacity(4096);
            let mut stream = None;
            while Instant::now() < end {
                let started = Instant::now();
                let ok = if framed {
                    if stream.is_none() || reconnect {
                        stream = open(port, &tls).await.ok();
                    }
                    match stream.as_mut() {
                        Some(s) => framed_exchange(s, &frame, &mut reply).await.is_ok(),
                        None => false,
                    }
                } else {
                    classic_exchange(port, &tls, &frame, &mut reply).await.is_ok()
                };
                if !ok {
                    errors += 1;
                    stream = None;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                if started >= begin {
                    latencies.push(started.elapsed().as_nanos().min(u32::MAX as u128) as u32);
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (latencies, task_errors) = task.await.expect("load task");
        all.extend(latencies);
        errors += task_errors;
    }
    all.sort_unstable();
    let pick = |q: f64| if all.is_empty() { 0.0 } else { all[((all.len() - 1) as f64 * q) as usize] as f64 / 1000.0 };
    println!(
        "{{\"exchanges\": {}, \"seconds\": {seconds}, \"rate\": {:.1}, \"p50_us\": {:.1}, \"p99_us\": {:.1}, \"errors\": {errors}}}",
        all.len(),
        all.len() as f64 / seconds,
        pick(0.5),
        pick(0.99)
    );
}

async fn framed_exchange<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(
    stream: &mut S,
    frame: &[u8],
    reply: &mut Vec<u8>,
) -> std::io::Result<()> {
    stream.write_all(frame).await?;
    // Reads whatever has arrived, not the header and then the body: on a small machine every
    // syscall the load generator makes is CPU taken from the server it measures, and reading
    // the two apart cost one more recv per exchange (3 instead of 2, counting the one that
    // finds nothing yet and waits).
    reply.clear();
    let mut whole = 4;
    while reply.len() < whole {
        reply.reserve((whole - reply.len()).max(4096));
        if stream.read_buf(reply).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if whole == 4 && reply.len() >= 4 {
            let header: [u8; 4] = reply[..4].try_into().expect("four bytes");
            whole = 4 + (u32::from_be_bytes(header) & 0x7fff_ffff) as usize;
        }
    }
    if reply.len() > whole {
        return Err(std::io::Error::other("bytes past the reply: this load sends one request at a time"));
    }
    Ok(())
}

async fn classic_exchange(
    port: u16,
    tls: &Option<tokio_rustls::TlsConnector>,
    frame: &[u8],
    reply: &mut Vec<u8>,
) -> std::io::Result<()> {
    let mut stream = open(port, tls).await?;
    stream.write_all(frame).await?;
    reply.clear();
    // A TLS server may close without close_notify: what came is the reply.
    match stream.read_to_end(reply).await {
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(err) => return Err(err),
    }
    if reply.is_empty() {
        return Err(std::io::Error::other("no reply"));
    }
    Ok(())
}

async fn bigframes(opts: &HashMap<String, String>) {
    let port = number(opts, "port", 0) as u16;
    let size = number(opts, "size", 64 << 20) as usize;
    let count = number(opts, "count", 8);
    let mut frame = (size as u32).to_be_bytes().to_vec();
    frame.resize(4 + size, b'x');
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    stream.set_nodelay(true).ok();
    let mut reply = Vec::new();
    framed_exchange(&mut stream, &frame, &mut reply).await.expect("warm-up frame");
    let started = Instant::now();
    for _ in 0..count {
        framed_exchange(&mut stream, &frame, &mut reply).await.expect("frame");
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{{\"frames\": {count}, \"seconds\": {seconds:.3}, \"gb_per_s\": {:.3}, \"rate\": {:.2}}}",
        (size as f64 * count as f64) / seconds / 1e9,
        count as f64 / seconds
    );
}
