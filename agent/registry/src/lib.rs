//! The OCI distribution (Docker Registry v2) client Baton's agent pulls with
//! and its controller resolves tags with: image references with Docker Hub's
//! defaults, anonymous, basic and bearer-token auth, HTTPS (web PKI roots, or
//! a CA configured for the registry) or plain HTTP for loopback and
//! configured-insecure registries, and manifests verified against their
//! digest. Blocking: callers run it off async threads.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::Mutex;
use std::time::Duration;

use sha2::Digest as _;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("manifest {expected} is corrupt: its content hashes to {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

/// `sha256:` and 64 lowercase hex digits.
pub fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let hash = sha2::Sha256::digest(bytes);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in hash {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A manifest or index as the registry served it.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub digest: String,
    pub media_type: String,
    pub bytes: Vec<u8>,
}

const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
const MAX_MANIFEST: u64 = 4 << 20;

/// `registry/repository[:tag][@digest]`, with Docker Hub's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Host (and port) to talk to.
    pub registry: String,
    pub repository: String,
    pub tag: String,
    /// `sha256:<64 hex>` when the reference pins one.
    pub digest: Option<String>,
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self, RegistryError> {
        let bad = |why: &str| RegistryError::Invalid(format!("image reference {s:?}: {why}"));
        let (name, digest) = match s.split_once('@') {
            Some((n, d)) if is_digest(d) => (n, Some(d.to_string())),
            Some(_) => return Err(bad("the digest must be sha256:<64 hex digits>")),
            None => (s, None),
        };
        let (name, tag) = match name.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, t.to_string()),
            _ => (name, "latest".to_string()),
        };
        let (registry, repository) = match name.split_once('/') {
            // Docker Hub's names for itself all mean its registry.
            Some(("docker.io" | "index.docker.io" | "registry-1.docker.io", rest)) => {
                ("registry-1.docker.io".to_string(), rest.to_string())
            }
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_string(), rest.to_string())
            }
            _ => ("registry-1.docker.io".to_string(), name.to_string()),
        };
        let repository = if registry == "registry-1.docker.io" && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c);
        if repository.is_empty() || !repository.chars().all(ok) {
            return Err(bad("the repository must be lowercase a-z 0-9 . _ - /"));
        }
        if tag.is_empty() || !tag.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
            return Err(bad("bad tag"));
        }
        Ok(Self { registry, repository, tag, digest })
    }

    /// The one spelling of what this names (`busybox`, `docker.io/library/busybox:latest`
    /// and `registry-1.docker.io/library/busybox` are the same image).
    pub fn canonical(&self) -> String {
        match &self.digest {
            Some(d) => format!("{}/{}@{d}", self.registry, self.repository),
            None => format!("{}/{}:{}", self.registry, self.repository, self.tag),
        }
    }

    /// The tag or digest to ask the registry for.
    pub fn reference(&self) -> String {
        self.digest.clone().unwrap_or_else(|| self.tag.clone())
    }
}

#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// Hosts spoken to over plain HTTP (loopback ones always are, as Docker does).
    pub insecure: Vec<String>,
    /// Host → (username, password).
    pub credentials: BTreeMap<String, (String, String)>,
    /// Host → the CA certificates (PEM) its HTTPS certificate chains to,
    /// instead of the web PKI roots (a registry with a private CA). Check
    /// them with `parse_ca` when the configuration is read.
    pub ca_pem: BTreeMap<String, Vec<u8>>,
}

/// The certificates in a PEM file; an error when there are none.
pub fn parse_ca(pem: &[u8]) -> Result<Vec<ureq::tls::Certificate<'static>>, RegistryError> {
    let certs: Vec<_> = ureq::tls::parse_pem(pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c.to_owned()),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        return Err(RegistryError::Invalid("no PEM certificate found".into()));
    }
    Ok(certs)
}

pub struct Client {
    http: ureq::Agent,
    /// Host → a client trusting only that registry's configured CA.
    private: HashMap<String, ureq::Agent>,
    config: RegistryConfig,
    /// (registry, repository) → bearer token.
    tokens: Mutex<HashMap<(String, String), String>>,
}

fn is_loopback(host: &str) -> bool {
    let h = host.rsplit_once(':').map_or(host, |(h, p)| if p.chars().all(|c| c.is_ascii_digit()) { h } else { host });
    let h = h.trim_start_matches('[').trim_end_matches(']');
    h == "localhost" || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `Bearer realm="…",service="…",scope="…"` → its parameters.
fn parse_challenge(header: &str) -> (String, BTreeMap<String, String>) {
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = BTreeMap::new();
    for part in rest.split(',') {
        if let Some((k, v)) = part.trim().split_once('=') {
            params.insert(k.trim().to_lowercase(), v.trim().trim_matches('"').to_string());
        }
    }
    (scheme.to_lowercase(), params)
}

fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub type Response = ureq::http::Response<ureq::Body>;

impl Client {
    pub fn new(config: RegistryConfig) -> Self {
        let builder = || {
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_connect(Some(Duration::from_secs(15)))
                // A stalled transfer fails and resumes rather than hanging forever.
                .timeout_recv_body(Some(Duration::from_secs(60)))
                .timeout_recv_response(Some(Duration::from_secs(30)))
        };
        let http = builder().build().into();
        let private = config
            .ca_pem
            .iter()
            .map(|(host, pem)| {
                // An unparsable CA trusts nothing: that registry's requests fail and say so.
                let certs = parse_ca(pem).unwrap_or_default();
                let tls =
                    ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::new_with_certs(&certs)).build();
                (host.clone(), builder().tls_config(tls).build().into())
            })
            .collect();
        Self { http, private, config, tokens: Mutex::new(HashMap::new()) }
    }

    /// The client for requests to `host` (`host[:port]`).
    fn agent(&self, host: &str) -> &ureq::Agent {
        self.private.get(host).unwrap_or(&self.http)
    }

    fn url(&self, r: &Reference, path: &str) -> String {
        let scheme = if is_loopback(&r.registry) || self.config.insecure.iter().any(|h| h == &r.registry) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{}/v2/{}/{path}", r.registry, r.repository)
    }

    fn basic(&self, registry: &str) -> Option<String> {
        self.config.credentials.get(registry).map(|(u, p)| format!("Basic {}", base64(format!("{u}:{p}").as_bytes())))
    }

    fn token(&self, r: &Reference) -> Option<String> {
        self.tokens.lock().ok()?.get(&(r.registry.clone(), r.repository.clone())).cloned()
    }

    /// Answers an auth challenge: fetches a bearer token, or settles on basic auth.
    fn authenticate(&self, r: &Reference, challenge: &str) -> Result<String, RegistryError> {
        let (scheme, params) = parse_challenge(challenge);
        let header = match scheme.as_str() {
            "basic" => self.basic(&r.registry).ok_or_else(|| {
                RegistryError::Invalid(format!("{} wants a username and password; none configured", r.registry))
            })?,
            "bearer" => {
                let realm =
                    params.get("realm").ok_or_else(|| RegistryError::Invalid("auth challenge without realm".into()))?;
                // The token service may live elsewhere; a private CA applies to its host too.
                let realm_host = realm.split_once("://").map_or(realm.as_str(), |(_, rest)| rest);
                let realm_host = realm_host.split('/').next().unwrap_or_default();
                let mut req = self.agent(realm_host).get(realm);
                if let Some(service) = params.get("service") {
                    req = req.query("service", service);
                }
                req = req.query("scope", format!("repository:{}:pull", r.repository));
                if let Some(basic) = self.basic(&r.registry) {
                    req = req.header("Authorization", &basic);
                }
                let mut res = req.call().map_err(|e| RegistryError::Invalid(format!("token from {realm}: {e}")))?;
                if !res.status().is_success() {
                    return Err(RegistryError::Invalid(format!(
                        "{} refused a pull token ({})",
                        r.registry,
                        res.status()
                    )));
                }
                let text = res
                    .body_mut()
                    .read_to_string()
                    .map_err(|e| RegistryError::Invalid(format!("token response: {e}")))?;
                let body: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| RegistryError::Invalid(format!("token response: {e}")))?;
                let token = body["token"].as_str().or(body["access_token"].as_str()).unwrap_or_default();
                format!("Bearer {token}")
            }
            other => return Err(RegistryError::Invalid(format!("{}: unsupported auth scheme {other:?}", r.registry))),
        };
        if let Ok(mut t) = self.tokens.lock() {
            t.insert((r.registry.clone(), r.repository.clone()), header.clone());
        }
        Ok(header)
    }

    /// GET with auth (challenge answered once) and optional Range.
    pub fn get(&self, r: &Reference, path: &str, accept: Option<&str>, from: u64) -> Result<Response, RegistryError> {
        let send = |auth: Option<&str>| {
            let mut req = self.agent(&r.registry).get(self.url(r, path));
            if let Some(a) = accept {
                req = req.header("Accept", a);
            }
            if let Some(a) = auth {
                req = req.header("Authorization", a);
            }
            if from > 0 {
                req = req.header("Range", &format!("bytes={from}-"));
            }
            req.call().map_err(|e| RegistryError::Invalid(format!("{}: {e}", r.registry)))
        };
        let mut res = send(self.token(r).as_deref())?;
        if res.status() == 401 {
            let challenge =
                res.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            let auth = self.authenticate(r, &challenge)?;
            res = send(Some(&auth))?;
        }
        let status = res.status();
        if status.is_success() {
            return Ok(res);
        }
        let what = format!("{}/{}", r.registry, r.repository);
        Err(match status.as_u16() {
            401 | 403 => RegistryError::Invalid(format!("{what}: access denied (check the registry credentials)")),
            404 => RegistryError::NotFound(format!("{what}: {path}")),
            code => RegistryError::Invalid(format!("{what}/{path}: HTTP {code}")),
        })
    }

    /// Fetches a manifest or index (at most 4 MiB) and checks it against the
    /// digest asked for, when `reference` is one.
    pub fn manifest(&self, r: &Reference, reference: &str) -> Result<Fetched, RegistryError> {
        let mut res = self.get(r, &format!("manifests/{reference}"), Some(ACCEPT_MANIFESTS), 0)?;
        let media_type = res.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let mut bytes = Vec::new();
        res.body_mut()
            .as_reader()
            .take(MAX_MANIFEST + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| RegistryError::Io { context: format!("read manifest {reference}"), source })?;
        if bytes.len() as u64 > MAX_MANIFEST {
            return Err(RegistryError::Invalid(format!("{reference}: manifest larger than {MAX_MANIFEST} bytes")));
        }
        let digest = sha256_digest(&bytes);
        if is_digest(reference) && reference != digest {
            return Err(RegistryError::DigestMismatch { expected: reference.to_string(), actual: digest });
        }
        Ok(Fetched { digest, media_type, bytes })
    }

    /// The digest `image` names right now (a tag's manifest or index; a
    /// reference that pins a digest is checked against the registry).
    pub fn resolve(&self, image: &str) -> Result<String, RegistryError> {
        Ok(self.resolve_platforms(image)?.0)
    }

    /// As `resolve`, with the platforms (`os/arch[/variant]`) an index or
    /// manifest list offers; `None` for a single-platform manifest. Entries
    /// for `unknown/unknown` (buildx attestations) are not platforms.
    pub fn resolve_platforms(&self, image: &str) -> Result<(String, Option<Vec<String>>), RegistryError> {
        let r = Reference::parse(image)?;
        let fetched = self.manifest(&r, &r.reference())?;
        let platforms = serde_json::from_slice::<serde_json::Value>(&fetched.bytes)
            .ok()
            .and_then(|v| v.get("manifests").and_then(|m| m.as_array()).cloned())
            .map(|entries| {
                entries
                    .iter()
                    .filter_map(|e| {
                        let p = e.get("platform")?;
                        let (os, arch) = (p.get("os")?.as_str()?, p.get("architecture")?.as_str()?);
                        if os == "unknown" || arch == "unknown" {
                            return None;
                        }
                        Some(match p.get("variant").and_then(|v| v.as_str()).filter(|v| !v.is_empty()) {
                            Some(v) => format!("{os}/{arch}/{v}"),
                            None => format!("{os}/{arch}"),
                        })
                    })
                    .collect()
            });
        Ok((fetched.digest, platforms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_with_docker_hub_defaults() {
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_str()),
            ("registry-1.docker.io", "library/busybox", "latest")
        );
        let r = Reference::parse("127.0.0.1:5000/team/app:1.2").unwrap();
        assert_eq!((r.registry.as_str(), r.repository.as_str(), r.tag.as_str()), ("127.0.0.1:5000", "team/app", "1.2"));
        let d = format!("sha256:{}", "a".repeat(64));
        assert!(Reference::parse("ghcr.io/o/app@sha256:abc").is_err());
        let r = Reference::parse(&format!("ghcr.io/o/app@{d}")).unwrap();
        assert_eq!((r.tag.as_str(), r.reference()), ("latest", d));
        assert!(Reference::parse("Bad/Upper").is_err());
        for same in ["busybox", "busybox:latest", "docker.io/library/busybox", "index.docker.io/library/busybox:latest"]
        {
            assert_eq!(Reference::parse(same).unwrap().canonical(), "registry-1.docker.io/library/busybox:latest");
        }
        assert_eq!(Reference::parse("docker.io/apps/x:1").unwrap().canonical(), "registry-1.docker.io/apps/x:1");
        assert!(is_loopback("127.0.0.1:5000") && is_loopback("localhost") && !is_loopback("registry.lan:5000"));
    }

    #[test]
    fn challenges_and_basic_auth() {
        let (scheme, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        );
        assert_eq!(scheme, "bearer");
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(base64(b"a"), "YQ==");
    }
}
