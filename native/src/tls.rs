//! TLS on the client port: the certificate and key from files, reloaded when the files change
//! (a mounted Secret changes by a symlink swap, so the files are read again rather than
//! watched), ALPN h2, and optionally client certificates (mTLS) verified against a CA, with an
//! allow-list of client identities (SAN DNS names, SAN URIs such as SPIFFE IDs, or the CN).
//!
//! A refused client identity fails the TLS handshake itself: the client sees the handshake
//! fail, no call is ever accepted on the connection.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use tokio_rustls::rustls::client::danger::HandshakeSignatureValid;
use tokio_rustls::rustls::crypto::{ring, CryptoProvider};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio_rustls::TlsAcceptor;

/// Where the client port's TLS material is, and who may connect.
pub struct Paths {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Client certificates are required and verified against this CA bundle when set.
    pub client_ca: Option<PathBuf>,
    /// Allowed client identities; empty: any certificate the CA verifies.
    pub allowed: Vec<String>,
}

pub struct ServerTls {
    paths: Paths,
    config: RwLock<Arc<ServerConfig>>,
    /// The files' contents the config was built from.
    loaded: Mutex<Vec<u8>>,
    /// Plaintext h2c is accepted on the same port too.
    pub allow_h2c: bool,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn read(what: &str, path: &PathBuf) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

impl ServerTls {
    pub fn load(paths: Paths, allow_h2c: bool) -> Result<Self, String> {
        let (config, contents) = build(&paths)?;
        Ok(ServerTls {
            paths,
            config: RwLock::new(Arc::new(config)),
            loaded: Mutex::new(contents),
            allow_h2c,
        })
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(
            &self.config.read().unwrap_or_else(|e| e.into_inner()),
        ))
    }

    /// Reads the files again; a new config when they changed: Some(Ok) when it took, Some(Err)
    /// when the new files are unusable (the old config stays), None when nothing changed.
    pub fn reload(&self) -> Option<Result<(), String>> {
        let contents = match contents(&self.paths) {
            Ok(c) => c,
            Err(e) => return Some(Err(e)),
        };
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if *loaded == contents {
            return None;
        }
        Some(build(&self.paths).map(|(config, contents)| {
            *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
            *loaded = contents;
        }))
    }
}

fn contents(paths: &Paths) -> Result<Vec<u8>, String> {
    let mut all = read("the certificate", &paths.cert)?;
    all.extend(read("the key", &paths.key)?);
    if let Some(ca) = &paths.client_ca {
        all.extend(read("the client CA", ca)?);
    }
    Ok(all)
}

fn certificates(what: &str, path: &PathBuf) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

fn build(paths: &Paths) -> Result<(ServerConfig, Vec<u8>), String> {
    let contents = contents(paths)?;
    let certs = certificates("the certificate", &paths.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read("the key", &paths.key)?)
        .map_err(|e| format!("the key {}: {e}", paths.key.display()))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &paths.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("the client CA", ca)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("the client CA {}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("the client CA {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(if paths.allowed.is_empty() {
                verifier
            } else {
                Arc::new(AllowList {
                    inner: verifier,
                    allowed: paths.allowed.clone(),
                })
            })
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("the certificate and key do not go together: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((config, contents))
}

/// The identities a certificate names: its SAN DNS names and URIs, and its subject's CN.
pub fn identities(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut ids = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) | GeneralName::URI(n) => ids.push((*n).to_string()),
                _ => {}
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(cn) = cn.as_str() {
            ids.push(cn.to_string());
        }
    }
    ids
}

/// Verifies as `inner` does, then requires one of the certificate's identities to be allowed.
#[derive(Debug)]
struct AllowList {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
}

impl ClientCertVerifier for AllowList {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if identities(end_entity)
            .iter()
            .any(|id| self.allowed.contains(id))
        {
            Ok(verified)
        } else {
            Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// TLS to a Service's backends: the name their certificates must carry (also sent as SNI),
/// the CA bundle that signs them, and the proxy's own certificate when they require one.
pub struct ClientTls {
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: tokio_rustls::rustls::pki_types::ServerName<'static>,
    /// Tells configurations apart in the pool: endpoints reached with different TLS settings
    /// get different connections.
    pub key: String,
}

/// (server name, CA bundle file, client certificate file or "", its key file or "")
pub type ClientTlsArg = (String, String, String, String);

impl ClientTls {
    pub fn load((server_name, ca, cert, key): ClientTlsArg) -> Result<Self, String> {
        use tokio_rustls::rustls::pki_types::ServerName;
        use tokio_rustls::rustls::ClientConfig;
        let ca_path = PathBuf::from(&ca);
        // What the files hold now is part of the key: rotated files make a new configuration,
        // so endpoints get new connections with them while calls finish on the old ones.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for path in [&ca, &cert, &key].into_iter().filter(|p| !p.is_empty()) {
            std::hash::Hash::hash(
                &read("a backend TLS file", &PathBuf::from(path))?,
                &mut hasher,
            );
        }
        let contents = std::hash::Hasher::finish(&hasher);
        let mut roots = RootCertStore::empty();
        for c in certificates("the backend CA", &ca_path)? {
            roots
                .add(c)
                .map_err(|e| format!("the backend CA {ca}: {e}"))?;
        }
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let mut config = if cert.is_empty() {
            builder.with_no_client_auth()
        } else {
            let chain = certificates("the backend client certificate", &PathBuf::from(&cert))?;
            let private = PrivateKeyDer::from_pem_slice(&read(
                "the backend client key",
                &PathBuf::from(&key),
            )?)
            .map_err(|e| format!("the backend client key {key}: {e}"))?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|e| format!("the backend client certificate and key: {e}"))?
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let name = ServerName::try_from(server_name.clone())
            .map_err(|_| format!("{server_name:?} is not a DNS name or IP address"))?;
        Ok(ClientTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name: name,
            key: format!("tls:{server_name}|{ca}|{cert}|{key}|{contents:016x}"),
        })
    }
}
