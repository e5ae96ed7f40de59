//! TLS settings, built once and shared: rustls with the `ring` provider, TLS 1.2 and 1.3.
//!
//! Certificates and keys come as PEM (a file's text, or bytes given directly), read with
//! rustls' own PEM support; every problem is found here, when the settings are made, and
//! described in words that name the input, before anything touches the network.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};

/// PEM text and where it came from (a path, or "the bytes given"), for messages.
pub struct Pem {
    pub text: Vec<u8>,
    pub origin: String,
}

/// The largest PEM file read: a certificate chain or key is a few KiB, the largest CA bundles
/// (every public root) about 250 KiB.
pub const MAX_PEM_FILE: u64 = 4 * 1024 * 1024;

impl Pem {
    /// The text of the PEM file at `path`, given as `argument`. Only a regular file of at most
    /// [`MAX_PEM_FILE`] bytes is read: a device (`/dev/zero`) would be read until memory ran
    /// out, and a FIFO would wait for a writer (it is opened without waiting, then refused).
    pub fn from_file(argument: &str, path: &std::path::Path) -> Result<Pem, BadSettings> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let origin = format!("{argument} ({})", path.display());
        let cannot = |err: std::io::Error| {
            BadSettings(format!("{argument}: cannot read {}: {err}", path.display()))
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(cannot)?;
        let metadata = file.metadata().map_err(cannot)?;
        if !metadata.is_file() {
            return Err(BadSettings(format!(
                "{origin}: not a regular file (a PEM file is expected)"
            )));
        }
        if metadata.len() > MAX_PEM_FILE {
            return Err(too_large(&origin));
        }
        let mut text = Vec::with_capacity(metadata.len() as usize);
        // Bounded again while reading: the file may grow meanwhile.
        file.take(MAX_PEM_FILE + 1)
            .read_to_end(&mut text)
            .map_err(cannot)?;
        if text.len() as u64 > MAX_PEM_FILE {
            return Err(too_large(&origin));
        }
        Ok(Pem { text, origin })
    }
}

fn too_large(origin: &str) -> BadSettings {
    BadSettings(format!(
        "{origin}: larger than {} MiB, too large for a PEM file",
        MAX_PEM_FILE / (1024 * 1024)
    ))
}

/// A problem with TLS settings, in words.
#[derive(Debug)]
pub struct BadSettings(pub String);

impl std::fmt::Display for BadSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(pem: &Pem) -> Result<Vec<CertificateDer<'static>>, BadSettings> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem.text)
        .collect::<Result<_, _>>()
        .map_err(|err| BadSettings(format!("{}: not PEM certificates ({err})", pem.origin)))?;
    if certs.is_empty() {
        return Err(BadSettings(format!(
            "{}: no certificate found (expected a PEM \"BEGIN CERTIFICATE\" block)",
            pem.origin
        )));
    }
    Ok(certs)
}

fn private_key(pem: &Pem) -> Result<PrivateKeyDer<'static>, BadSettings> {
    PrivateKeyDer::from_pem_slice(&pem.text).map_err(|err| {
        BadSettings(format!(
            "{}: no private key found ({err}; expected a PEM \"BEGIN PRIVATE KEY\", \
             \"BEGIN RSA PRIVATE KEY\" or \"BEGIN EC PRIVATE KEY\" block)",
            pem.origin
        ))
    })
}

fn roots(pem: &Pem) -> Result<RootCertStore, BadSettings> {
    let mut store = RootCertStore::empty();
    for cert in certificates(pem)? {
        store.add(cert).map_err(|err| {
            BadSettings(format!(
                "{}: not a usable CA certificate ({err})",
                pem.origin
            ))
        })?;
    }
    Ok(store)
}

/// The operating system's trusted roots.
fn system_roots() -> Result<RootCertStore, BadSettings> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(BadSettings(
            "no trusted CA certificates found on this system; pass ca=".to_owned(),
        ));
    }
    Ok(store)
}

/// A server's TLS settings: its certificate chain and key, and optionally the CA that client
/// certificates must chain to (mutual TLS: clients without one are refused).
#[derive(Clone)]
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    pub requires_client_certificate: bool,
}

impl ServerTls {
    pub fn new(cert: &Pem, key: &Pem, client_ca: Option<&Pem>) -> Result<Self, BadSettings> {
        let chain = certificates(cert)?;
        let key = private_key(key)?;
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|err| BadSettings(err.to_string()))?;
        let builder = match client_ca {
            Some(ca) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider)
                        .build()
                        .map_err(|err| BadSettings(format!("{}: {err}", ca.origin)))?;
                builder.with_client_cert_verifier(Arc::new(ShortChains(verifier)))
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(chain, key).map_err(|err| {
            BadSettings(format!(
                "{} and {} do not go together: {err}",
                cert.origin, "the key"
            ))
        })?;
        Ok(ServerTls {
            config: Arc::new(config),
            requires_client_certificate: client_ca.is_some(),
        })
    }
}

/// The most intermediate certificates a client may send. Real client chains carry none to
/// two, and webpki builds paths through at most six; each one sent costs the server a parse
/// and a signature check while it looks for a path: 120 fake intermediates made a handshake
/// cost 14.9 ms of CPU instead of 0.44.
pub const MAX_CLIENT_INTERMEDIATES: usize = 8;

/// A client certificate verifier that refuses a long chain before looking at it.
#[derive(Debug)]
struct ShortChains(Arc<dyn ClientCertVerifier>);

/// Why a client chain was refused unread.
#[derive(Debug)]
struct TooManyIntermediates(usize);

impl std::fmt::Display for TooManyIntermediates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the client sent {} intermediate certificates, more than the {MAX_CLIENT_INTERMEDIATES} accepted",
            self.0
        )
    }
}

impl std::error::Error for TooManyIntermediates {}

impl ClientCertVerifier for ShortChains {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if intermediates.len() > MAX_CLIENT_INTERMEDIATES {
            let refused = TooManyIntermediates(intermediates.len());
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(refused)),
            )));
        }
        self.0.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A client's TLS settings: the CAs server certificates must chain to (None: the system's),
/// an optional client certificate, and the name to check the server's certificate against
/// (default: the host connected to; an IP address is checked as an IP SAN).
#[derive(Clone)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    pub server_name: Option<String>,
}

impl ClientTls {
    pub fn new(
        ca: Option<&Pem>,
        cert: Option<&Pem>,
        key: Option<&Pem>,
        server_name: Option<String>,
    ) -> Result<Self, BadSettings> {
        let roots = match ca {
            Some(ca) => roots(ca)?,
            None => system_roots()?,
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|err| BadSettings(err.to_string()))?
            .with_root_certificates(roots);
        let config = match (cert, key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(certificates(cert)?, private_key(key)?)
                .map_err(|err| {
                    BadSettings(format!(
                        "{} and its key do not go together: {err}",
                        cert.origin
                    ))
                })?,
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(BadSettings(
                    "cert and key go together: pass both or neither".to_owned(),
                ))
            }
        };
        if let Some(name) = &server_name {
            ServerName::try_from(name.clone())
                .map_err(|_| BadSettings(format!("server_name {name:?} is not a valid name")))?;
        }
        Ok(ClientTls {
            config: Arc::new(config),
            server_name,
        })
    }

    /// The name the server's certificate must carry when connecting to `host`.
    pub fn name_for(&self, host: &str) -> Result<ServerName<'static>, String> {
        let name = self.server_name.as_deref().unwrap_or(host);
        // "[::1]" from a URL-ish host, or plain "::1": both are the IPv6 address.
        let name = name.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(name.to_owned())
            .map_err(|_| format!("{name:?} is not a name a certificate can be checked against"))
    }
}

/// Whether an I/O error is rustls refusing something (rather than the socket failing).
pub fn is_tls_failure(err: &std::io::Error) -> bool {
    err.get_ref()
        .is_some_and(|inner| inner.is::<rustls::Error>())
}

/// Why a handshake failed, in words, from the error tokio-rustls gives (a rustls error inside
/// an I/O error, or the I/O error itself). `side` is "server" or "client": the peer's role.
pub fn describe_failure(err: &std::io::Error, peer: &str) -> String {
    use rustls::{AlertDescription, CertificateError, Error as TlsError};
    let Some(tls) = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<TlsError>())
    else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                format!("the {peer} closed the connection during the TLS handshake (does it speak TLS?)")
            }
            _ => format!("TLS handshake with the {peer} failed: {err}"),
        };
    };
    let why = match tls {
        TlsError::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => format!(
                "the {peer}'s certificate is signed by an unknown issuer (not a CA it was told to trust)"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("the {peer}'s certificate is not valid for the name asked for: {cert:?}")
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("the {peer}'s certificate has expired")
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!("the {peer}'s certificate is not valid yet")
            }
            CertificateError::Other(why) => format!("the {peer}'s certificate was refused: {why}"),
            other => format!("the {peer}'s certificate was refused: {other:?}"),
        },
        TlsError::NoCertificatesPresented => {
            format!("the {peer} presented no certificate (mutual TLS requires one)")
        }
        TlsError::AlertReceived(alert) => match alert {
            AlertDescription::CertificateRequired => {
                format!("the {peer} requires a client certificate (mutual TLS) and none was given")
            }
            AlertDescription::UnknownCA => {
                format!("the {peer} does not trust the certificate presented (unknown CA)")
            }
            AlertDescription::BadCertificate | AlertDescription::CertificateExpired => {
                format!("the {peer} refused the certificate presented ({alert:?})")
            }
            other => format!("the {peer} ended the TLS handshake ({other:?})"),
        },
        TlsError::InvalidMessage(_) | TlsError::InappropriateMessage { .. } => format!(
            "the {peer} does not speak TLS (it sent something that is not a TLS record)"
        ),
        other => format!("TLS handshake with the {peer} failed: {other}"),
    };
    why
}

/// A client certificate the server verified (mutual TLS).
#[derive(Debug, Clone)]
pub struct PeerCertificate {
    /// The subject, as RFC 4514 writes it (e.g. `CN=client one,O=...`).
    pub subject: String,
    /// The subject alternative names, each as `DNS:name`, `IP:address`, `email:...` or `URI:...`.
    pub alt_names: Vec<String>,
    /// The certificate itself (DER).
    pub der: Vec<u8>,
}

/// What a verified client certificate says about its holder: subject and alternative names.
pub fn describe_certificate(der: Vec<u8>) -> PeerCertificate {
    use x509_parser::extensions::GeneralName;
    let (subject, alt_names) = match x509_parser::parse_x509_certificate(&der) {
        Ok((_, cert)) => {
            let alt_names = cert
                .subject_alternative_name()
                .ok()
                .flatten()
                .map(|ext| {
                    ext.value
                        .general_names
                        .iter()
                        .map(|name| match name {
                            GeneralName::DNSName(dns) => format!("DNS:{dns}"),
                            GeneralName::RFC822Name(email) => format!("email:{email}"),
                            GeneralName::URI(uri) => format!("URI:{uri}"),
                            GeneralName::IPAddress(bytes) => format!("IP:{}", ip_text(bytes)),
                            other => format!("{other}"),
                        })
                        .collect()
                })
                .unwrap_or_default();
            (cert.subject().to_string(), alt_names)
        }
        Err(_) => (String::new(), Vec::new()),
    };
    PeerCertificate {
        subject,
        alt_names,
        der,
    }
}

fn ip_text(bytes: &[u8]) -> String {
    match bytes.len() {
        4 => std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string(),
        16 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(bytes);
            std::net::Ipv6Addr::from(octets).to_string()
        }
        _ => format!("{bytes:?}"),
    }
}
