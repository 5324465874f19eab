//! The API's typed client, beside the routes it calls (`super::router`):
//! one method per route, taking and returning the `view` types; the CLI
//! goes through it and never spells a URL. Every failure says what went
//! wrong and what to do about it.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::store::AgentRelease;
use crate::view::{
    AgentRolloutView, AgentUpgradeRequest, ApiError, ApiTokenCreated, ApiTokenRequest, ApiTokenView, ApplyRequest,
    ApplyResult, ConnectRequest, CredentialsView, DeviceView, Event, ExecRequest, ExecResponse, FileRequest,
    JoinTokenView, LabelChange, ManifestFile, ResizeRequest, Role, RolloutAction, RolloutView, ScaleRequest,
    SecretView, SessionRequest, TokenRequest, TokenView, TrustView, WebhookCreated, WebhookRequest, WebhookView,
    WorkloadView,
};

pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

/// An open session: its id, the frames read so far, the rest of its stream.
pub type SessionStream = (u64, crate::sessions::FrameReader, Box<dyn std::io::Read + Send>);

pub struct Client {
    /// The controllers to try, in order (`--server` takes several,
    /// comma-separated: the replicas of one store).
    servers: Vec<String>,
    /// The one that serves (the leader), found at the first request when
    /// there are several.
    chosen: std::sync::OnceLock<String>,
    agent: ureq::Agent,
    /// `Authorization` header value, when the controller wants a token.
    auth: Option<String>,
    /// The tenant a fleet-wide operator acts for (`--tenant`).
    tenant: Option<String>,
}

impl Client {
    /// A client sending `token` and acting for `tenant`, trusting `ca_file`
    /// (PEM) for https:// servers. An unreadable CA file leaves the system
    /// roots (the request then says why it failed).
    pub fn with_options(
        base: &str,
        token: Option<&str>,
        tenant: Option<&str>,
        ca_file: Option<&std::path::Path>,
    ) -> Self {
        let mut c = Self::new(base);
        c.auth = token.map(|t| format!("Bearer {}", t.trim()));
        c.tenant = tenant.map(str::to_string);
        if let Some(path) = ca_file {
            match std::fs::read(path) {
                Ok(pem) => {
                    let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
                        .filter_map(|i| match i {
                            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c.to_owned()),
                            _ => None,
                        })
                        .collect();
                    let tls = ureq::tls::TlsConfig::builder()
                        .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
                        .build();
                    c.agent = Self::builder().tls_config(tls).build().into();
                }
                Err(e) => eprintln!("baton: cannot read --ca-file {}: {e}", path.display()),
            }
        }
        c
    }

    fn builder() -> ureq::config::ConfigBuilder<ureq::typestate::AgentScope> {
        ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(30)))
    }

    /// `base`: one controller's URL, or several comma-separated.
    pub fn new(base: &str) -> Self {
        let agent = Self::builder().build().into();
        let servers: Vec<String> =
            base.split(',').map(|s| s.trim().trim_end_matches('/').to_string()).filter(|s| !s.is_empty()).collect();
        Self { servers, chosen: std::sync::OnceLock::new(), agent, auth: None, tenant: None }
    }

    /// The controller requests go to: the only one given, or the first of
    /// several whose `/healthz` answers as serving (standbys answer 503).
    fn base(&self) -> anyhow::Result<&str> {
        if let [only] = &self.servers[..] {
            return Ok(only);
        }
        if let Some(chosen) = self.chosen.get() {
            return Ok(chosen);
        }
        let mut answers = Vec::new();
        for server in &self.servers {
            let probe = self
                .agent
                .get(format!("{server}/healthz"))
                .config()
                .timeout_global(Some(Duration::from_secs(5)))
                .build();
            match probe.call() {
                Ok(res) if res.status().is_success() => return Ok(self.chosen.get_or_init(|| server.clone())),
                Ok(res) if res.status().as_u16() == 503 => answers.push(format!("{server}: standing by")),
                Ok(res) => answers.push(format!("{server}: HTTP {}", res.status().as_u16())),
                Err(e) => answers.push(format!("{server}: {e}")),
            }
        }
        if self.servers.is_empty() {
            anyhow::bail!("no controller URL given (--server URL[,URL…] or BATON_SERVER)");
        }
        anyhow::bail!("none of the controllers serves:\n  {}", answers.join("\n  "))
    }

    fn url(&self, path: &str) -> anyhow::Result<String> {
        Ok(format!("{}{path}", self.base()?))
    }

    /// The controller named in messages.
    fn shown(&self) -> String {
        self.chosen.get().cloned().unwrap_or_else(|| self.servers.join(","))
    }

    // ---- One method per route, in the router's order. ----

    pub fn devices(&self) -> anyhow::Result<Vec<DeviceView>> {
        self.get("/api/v1/devices")
    }

    pub fn device(&self, id: &str) -> anyhow::Result<DeviceView> {
        self.get(&format!("/api/v1/devices/{id}"))
    }

    pub fn relabel(&self, id: &str, change: &LabelChange) -> anyhow::Result<DeviceView> {
        self.patch(&format!("/api/v1/devices/{id}/labels"), change)
    }

    pub fn assign_device(&self, id: &str, tenant: &str) -> anyhow::Result<DeviceView> {
        self.put(&format!("/api/v1/devices/{id}/tenant"), &serde_json::json!({ "tenant": tenant }))
    }

    pub fn workloads(&self) -> anyhow::Result<Vec<WorkloadView>> {
        self.get("/api/v1/workloads")
    }

    pub fn apply(&self, files: Vec<ManifestFile>) -> anyhow::Result<Vec<ApplyResult>> {
        self.post("/api/v1/workloads", &ApplyRequest { files })
    }

    pub fn workload(&self, name: &str) -> anyhow::Result<WorkloadView> {
        self.get(&format!("/api/v1/workloads/{name}"))
    }

    pub fn delete_device(&self, id: &str) -> anyhow::Result<()> {
        self.delete::<serde_json::Value>(&format!("/api/v1/devices/{id}")).map(drop)
    }

    pub fn delete_workload(&self, name: &str) -> anyhow::Result<()> {
        self.delete::<serde_json::Value>(&format!("/api/v1/workloads/{name}")).map(drop)
    }

    pub fn scale(&self, name: &str, replicas: u32) -> anyhow::Result<WorkloadView> {
        self.post(&format!("/api/v1/workloads/{name}/scale"), &ScaleRequest { replicas })
    }

    pub fn rollout(&self, name: &str) -> anyhow::Result<RolloutView> {
        self.get(&format!("/api/v1/workloads/{name}/rollout"))
    }

    pub fn rollout_action(&self, name: &str, action: RolloutAction) -> anyhow::Result<RolloutView> {
        self.post(&format!("/api/v1/workloads/{name}/rollout/{}", action.as_str()), &serde_json::json!({}))
    }

    pub fn events(&self, subject: Option<&str>, limit: usize) -> anyhow::Result<Vec<Event>> {
        match subject {
            // Subjects are device ids and workload names: nothing to escape.
            Some(s) if s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) => {
                self.get(&format!("/api/v1/events?limit={limit}&subject={s}"))
            }
            Some(s) => anyhow::bail!("{s:?} is no device id or workload name"),
            None => self.get(&format!("/api/v1/events?limit={limit}")),
        }
    }

    pub fn secrets(&self) -> anyhow::Result<Vec<SecretView>> {
        self.get("/api/v1/secrets")
    }

    /// The value travels as the raw body: never JSON-encoded, never logged.
    pub fn put_secret(&self, name: &str, value: &[u8]) -> anyhow::Result<SecretView> {
        self.put_bytes(&format!("/api/v1/secrets/{name}"), value)
    }

    pub fn delete_secret(&self, name: &str) -> anyhow::Result<()> {
        self.delete::<serde_json::Value>(&format!("/api/v1/secrets/{name}")).map(drop)
    }

    pub fn trust(&self) -> anyhow::Result<TrustView> {
        self.get("/api/v1/trust")
    }

    pub fn issue_credentials(&self, id: &str) -> anyhow::Result<CredentialsView> {
        self.post(&format!("/api/v1/devices/{id}/credentials"), &serde_json::json!({}))
    }

    pub fn tokens(&self) -> anyhow::Result<Vec<JoinTokenView>> {
        self.get("/api/v1/tokens")
    }

    pub fn create_token(&self, req: &TokenRequest) -> anyhow::Result<TokenView> {
        self.post("/api/v1/tokens", req)
    }

    pub fn delete_token(&self, id: &str) -> anyhow::Result<()> {
        self.delete::<serde_json::Value>(&format!("/api/v1/tokens/{id}")).map(drop)
    }

    pub fn revoke_device(&self, id: &str) -> anyhow::Result<()> {
        self.post::<_, serde_json::Value>(&format!("/api/v1/devices/{id}/revoke"), &serde_json::json!({})).map(drop)
    }

    /// Copies the log to `out` as it arrives; with `follow`, until interrupted.
    pub fn logs(
        &self,
        device: &str,
        workload: &str,
        tail: u32,
        follow: bool,
        out: &mut dyn std::io::Write,
    ) -> anyhow::Result<()> {
        self.stream(&format!("/api/v1/devices/{device}/logs/{workload}?tail={tail}&follow={follow}"), out)
    }

    pub fn exec(&self, device: &str, req: &ExecRequest) -> anyhow::Result<ExecResponse> {
        // Past the controller's own wait for the device (75 s: the agent's
        // 60 s exec timeout and the round trip), so a silent device is
        // answered by the controller's 504 naming it, not by this timeout.
        let url = self.url(&format!("/api/v1/devices/{device}/exec"))?;
        let req_builder = self.agent.post(url).config().timeout_global(Some(Duration::from_secs(90))).build();
        let res = self.authed(req_builder).send_json(req);
        self.finish(res)
    }

    /// Opens an interactive session; its id and its stream of frames
    /// (`sessions::Frame`), the `Opened` one already read.
    pub fn session_open(&self, device: &str, req: &SessionRequest) -> anyhow::Result<SessionStream> {
        self.open_stream(&format!("/api/v1/devices/{device}/sessions"), req)
    }

    /// Opens one forwarded connection (`baton port-forward`), a session
    /// whose input and output are the connection's bytes.
    pub fn connect(&self, device: &str, req: &ConnectRequest) -> anyhow::Result<SessionStream> {
        self.open_stream(&format!("/api/v1/devices/{device}/connections"), req)
    }

    /// `baton cp` from the device: its bytes from `req.offset`, then its digest.
    pub fn read_file(&self, device: &str, req: &FileRequest) -> anyhow::Result<SessionStream> {
        self.open_stream(&format!("/api/v1/devices/{device}/files/read"), req)
    }

    /// `baton cp` to the device: a session whose input is the file.
    pub fn write_file(&self, device: &str, req: &FileRequest) -> anyhow::Result<SessionStream> {
        self.open_stream(&format!("/api/v1/devices/{device}/files/write"), req)
    }

    /// Whether a forwarded connection would be allowed (token, tenant,
    /// device online, workload), without opening one.
    pub fn check_connect(&self, device: &str, req: &ConnectRequest) -> anyhow::Result<()> {
        let req = ConnectRequest { check: true, ..req.clone() };
        self.post::<_, serde_json::Value>(&format!("/api/v1/devices/{device}/connections"), &req).map(drop)
    }

    fn open_stream<B: Serialize>(&self, path: &str, req: &B) -> anyhow::Result<SessionStream> {
        let url = self.url(path)?;
        let req_builder = self.agent.post(url).config().timeout_global(None).build();
        let mut res = self.authed(req_builder).send_json(req).map_err(|e| self.unreachable(e))?;
        if !res.status().is_success() {
            let status = res.status();
            let msg = res.body_mut().read_json::<ApiError>().map(|e| e.error).unwrap_or_else(|_| status.to_string());
            anyhow::bail!("{msg} (HTTP {})", status.as_u16());
        }
        let mut reader: Box<dyn std::io::Read + Send> = Box::new(res.into_body().into_reader());
        let mut frames = crate::sessions::FrameReader::default();
        let mut buf = [0u8; 64];
        loop {
            if let Some(f) = frames.next_frame().map_err(|e| anyhow::anyhow!("{e}"))? {
                let crate::sessions::Frame::Opened(id) = f else {
                    anyhow::bail!("the controller's session stream did not start with its id")
                };
                return Ok((id, frames, reader));
            }
            let n = reader.read(&mut buf)?;
            if n == 0 {
                anyhow::bail!("the controller closed the session before it opened");
            }
            frames.push(&buf[..n]);
        }
    }

    /// Bytes for a session's stdin; returns once the device wrote them.
    pub fn session_input(&self, session: u64, data: &[u8], eof: bool) -> anyhow::Result<()> {
        let url = self.url(&format!("/api/v1/sessions/{session}/input?eof={eof}"))?;
        // Answered once the device wrote it: as long as the remote process takes to read it.
        let req = self.agent.post(url).config().timeout_global(None).build();
        let res = self.authed(req).content_type("application/octet-stream").send(data);
        self.finish::<serde_json::Value>(res).map(drop)
    }

    pub fn session_resize(&self, session: u64, rows: u16, cols: u16) -> anyhow::Result<()> {
        self.post::<_, serde_json::Value>(&format!("/api/v1/sessions/{session}/resize"), &ResizeRequest { rows, cols })
            .map(drop)
    }

    pub fn restart(&self, device: &str, workload: &str) -> anyhow::Result<()> {
        let path = format!("/api/v1/devices/{device}/workloads/{workload}/restart");
        self.post::<_, serde_json::Value>(&path, &serde_json::json!({})).map(drop)
    }

    pub fn api_tokens(&self) -> anyhow::Result<Vec<ApiTokenView>> {
        self.get("/api/v1/apitokens")
    }

    pub fn create_api_token(&self, role: Role, name: &str) -> anyhow::Result<ApiTokenCreated> {
        self.post("/api/v1/apitokens", &ApiTokenRequest { role: role.as_str().into(), name: name.into() })
    }

    pub fn delete_api_token(&self, id: &str) -> anyhow::Result<()> {
        self.delete::<serde_json::Value>(&format!("/api/v1/apitokens/{id}")).map(drop)
    }

    pub fn webhooks(&self) -> anyhow::Result<Vec<WebhookView>> {
        self.get("/api/v1/webhooks")
    }

    pub fn create_webhook(&self, url: &str, events: Vec<String>) -> anyhow::Result<WebhookCreated> {
        self.post("/api/v1/webhooks", &WebhookRequest { url: url.into(), events })
    }

    pub fn delete_webhook(&self, id: &str) -> anyhow::Result<()> {
        self.delete::<serde_json::Value>(&format!("/api/v1/webhooks/{id}")).map(drop)
    }

    /// A consistent copy of the store (SQLite bytes).
    pub fn backup(&self) -> anyhow::Result<Vec<u8>> {
        self.post_for_bytes("/api/v1/backup")
    }

    // ---- Transport. ----

    fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let res = self.authed(self.agent.get(self.url(path)?)).call();
        self.finish(res)
    }

    fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        let res = self.authed(self.agent.post(self.url(path)?)).send_json(body);
        self.finish(res)
    }

    /// Copies a streamed response to `out` as it arrives (no overall timeout:
    /// `baton logs -f` runs until interrupted).
    fn stream(&self, path: &str, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
        let req = self.agent.get(self.url(path)?).config().timeout_global(None).build();
        let mut res = self.authed(req).call().map_err(|e| self.unreachable(e))?;
        if !res.status().is_success() {
            let status = res.status();
            let msg = res.body_mut().read_json::<ApiError>().map(|e| e.error).unwrap_or_else(|_| status.to_string());
            anyhow::bail!("{msg} (HTTP {})", status.as_u16());
        }
        let mut reader = res.body_mut().as_reader();
        let mut buf = [0u8; 8192];
        loop {
            let n = std::io::Read::read(&mut reader, &mut buf)?;
            if n == 0 {
                return Ok(());
            }
            out.write_all(&buf[..n])?;
            out.flush()?;
        }
    }

    pub fn releases(&self) -> anyhow::Result<Vec<AgentRelease>> {
        self.get("/api/v1/agent/releases")
    }

    /// Uploads an agent build (its version from the stamp in it, or `version`).
    pub fn publish_release(&self, data: &[u8], version: Option<&str>) -> anyhow::Result<AgentRelease> {
        let query = version.map(|v| format!("?version={}", url_escape(v))).unwrap_or_default();
        let path = format!("/api/v1/agent/releases{query}");
        let req = self.agent.post(self.url(&path)?).config().timeout_global(Some(Duration::from_secs(600))).build();
        let res = self.authed(req).content_type("application/octet-stream").send(data);
        self.finish(res)
    }

    /// Deletes a version's builds (of `arch`, or all); returns how many went.
    pub fn unpublish_release(&self, version: &str, arch: Option<&str>) -> anyhow::Result<u64> {
        let query = arch.map(|a| format!("?arch={}", url_escape(a))).unwrap_or_default();
        let v: serde_json::Value = self.delete(&format!("/api/v1/agent/releases/{}{query}", url_escape(version)))?;
        Ok(v["builds"].as_u64().unwrap_or(0))
    }

    pub fn agent_upgrade(&self, req: &AgentUpgradeRequest) -> anyhow::Result<AgentRolloutView> {
        self.post("/api/v1/agent/upgrade", req)
    }

    pub fn agent_rollout(&self) -> anyhow::Result<AgentRolloutView> {
        self.get("/api/v1/agent/rollout")
    }

    pub fn agent_rollout_action(&self, action: RolloutAction) -> anyhow::Result<AgentRolloutView> {
        self.post(&format!("/api/v1/agent/rollout/{}", action.as_str()), &serde_json::json!({}))
    }

    /// POST with no body; the answer's raw bytes (a backup).
    fn post_for_bytes(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let req = self.agent.post(self.url(path)?).config().timeout_global(None).build();
        let mut res = self.authed(req).send_empty().map_err(|e| self.unreachable(e))?;
        if !res.status().is_success() {
            let status = res.status();
            let msg = res.body_mut().read_json::<ApiError>().map(|e| e.error).unwrap_or_else(|_| status.to_string());
            anyhow::bail!("{msg} (HTTP {})", status.as_u16());
        }
        Ok(res.body_mut().with_config().limit(u64::MAX).read_to_vec()?)
    }

    /// PUT with a raw body (secret values: never JSON-encoded, never logged).
    fn put_bytes<T: DeserializeOwned>(&self, path: &str, body: &[u8]) -> anyhow::Result<T> {
        let res = self.authed(self.agent.put(self.url(path)?)).content_type("application/octet-stream").send(body);
        self.finish(res)
    }

    fn put<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        let res = self.authed(self.agent.put(self.url(path)?)).send_json(body);
        self.finish(res)
    }

    fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let res = self.authed(self.agent.delete(self.url(path)?)).call();
        self.finish(res)
    }

    fn patch<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        let res = self.authed(self.agent.patch(self.url(path)?)).send_json(body);
        self.finish(res)
    }

    fn authed<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        let req = match &self.auth {
            Some(a) => req.header("Authorization", a),
            None => req,
        };
        match &self.tenant {
            Some(t) => req.header(crate::tenant::HEADER, t),
            None => req,
        }
    }

    fn finish<T: DeserializeOwned>(
        &self,
        res: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<T> {
        let mut res = res.map_err(|e| self.unreachable(e))?;
        let status = res.status();
        if status.is_success() {
            return res
                .body_mut()
                .read_json()
                .map_err(|e| anyhow::anyhow!("the controller at {} sent a response this CLI cannot read: {e} (are the CLI and controller versions compatible?)", self.shown()));
        }
        let msg = res
            .body_mut()
            .read_json::<ApiError>()
            .map(|e| e.error)
            .unwrap_or_else(|_| status.canonical_reason().unwrap_or("error").to_string());
        anyhow::bail!("{msg} (HTTP {})", status.as_u16())
    }

    fn unreachable(&self, e: ureq::Error) -> anyhow::Error {
        let said = e.to_string();
        // It answered, but over TLS with a certificate this CLI does not trust.
        if said.contains("certificate") {
            return anyhow::anyhow!(
                "cannot trust the Baton controller at {}: {said}\n\
                 Give the CLI the controller's CA: --ca-file DATA_DIR/ca.crt (or BATON_CA_FILE), \
                 from the controller's data dir or `baton trust`'s machine.",
                self.shown()
            );
        }
        anyhow::anyhow!(
            "cannot reach the Baton controller at {}: {e}\n\
             Start one with `baton server` (or `baton up` for a controller plus a local agent),\n\
             or point the CLI at yours with --server URL or BATON_SERVER=URL.",
            self.shown()
        )
    }
}

/// A query value with everything but unreserved characters percent-encoded.
fn url_escape(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
