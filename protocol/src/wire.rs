//! How a [`Desired`] document travels, so that workload specs can grow.
//!
//! postcard puts no field names or lengths on the wire, so only a top-level
//! message may gain fields (appended, see `codec`). Workload and container
//! specs sit in a list inside `Desired`: their 1.4 layout is frozen here
//! ([`WorkloadV1`], [`ContainerV1`]) and fields added since travel in
//! `Desired.extensions` (appended in 1.5): per workload, the encoded
//! [`ContainerExt`] — itself a top-level postcard body that may gain
//! fields at its end by the same rule (padded with zeros when shorter,
//! trailing bytes ignored when longer). A 1.4 agent reads the document and
//! ignores the extensions; the controller makes that safe where it matters
//! (a user given by name also sets the numeric `user` to nobody, never root).
//!
//! In memory, [`WorkloadSpec`] and [`ContainerSpec`] carry every field;
//! `Desired` converts through [`DesiredV1`] on (de)serialisation.

use serde::{Deserialize, Serialize};

use crate::message::{Desired, ServiceEndpoints};
use crate::spec::*;

/// The wire form of `Desired`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct DesiredV1 {
    pub generation: u64,
    pub workloads: Vec<WorkloadV1>,
    pub services: Vec<ServiceEndpoints>,
    pub issued_ms: u64,
    /// Since 1.5: what workloads' specs gained after 1.4 (only those with any).
    pub extensions: Vec<Extension>,
    /// Since 1.6: the agent this device should run (`Desired::agent`).
    pub agent: Option<crate::release::AgentTarget>,
    /// Since 1.7: `Desired::service_ports`.
    pub service_ports: Vec<crate::message::ServicePort>,
    /// Since 1.8: `Desired::load_reports`.
    pub load_reports: Vec<String>,
    /// Since 1.8: `Desired::updates`.
    pub updates: Vec<crate::message::UpdatePolicy>,
}

/// `WorkloadSpec` as of 1.4 — frozen.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkloadV1 {
    pub name: String,
    pub revision: u64,
    pub image: String,
    pub image_digest: String,
    pub container: ContainerV1,
    pub health_deadline_s: u32,
}

/// `ContainerSpec` as of 1.4 — frozen.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerV1 {
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub user: Option<User>,
    pub hostname: Option<String>,
    pub resources: Resources,
    pub restart: RestartPolicy,
    pub backoff_cap_s: u32,
    pub mounts: Vec<Mount>,
    pub devices: Vec<DeviceMount>,
    pub network: NetworkMode,
    pub ports: Vec<Port>,
    pub read_only_rootfs: bool,
    pub security: Security,
    pub liveness: Option<Probe>,
    pub readiness: Option<Probe>,
    pub files: Vec<File>,
}

/// Since 1.5: one workload's fields from after 1.4.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Extension {
    pub workload: String,
    /// An encoded [`ContainerExt`] (see [`ContainerExt::decode`]).
    pub body: Vec<u8>,
}

/// Container fields added after 1.4, in the order they were added; each new
/// one is appended and defaults to what encodes as zero bytes.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerExt {
    /// 1.5: `ContainerSpec::user_name`.
    pub user_name: Option<String>,
    /// 1.5: `ContainerSpec::allow_privilege_escalation`.
    pub allow_privilege_escalation: bool,
    /// 1.7: `ContainerSpec::network` is `Bridge` (the 1.4 layout says `None`).
    pub bridge: bool,
    /// 1.7: `ContainerSpec::publish`.
    pub publish: Vec<Publish>,
    /// 1.7: `ContainerSpec::bandwidth`.
    pub bandwidth: Bandwidth,
    /// 1.7: `ContainerSpec::allow_from`.
    pub allow_from: Option<Vec<String>>,
}

/// Zeros appended to a shorter (older) extension body: more than every field
/// a later version may append encodes to at its default.
const EXT_PADDING: usize = 64;

impl ContainerExt {
    fn of(c: &ContainerSpec) -> Self {
        Self {
            user_name: c.user_name.clone(),
            allow_privilege_escalation: c.allow_privilege_escalation,
            bridge: c.network == NetworkMode::Bridge,
            publish: c.publish.clone(),
            bandwidth: c.bandwidth,
            allow_from: c.allow_from.clone(),
        }
    }

    fn apply(self, c: &mut ContainerSpec) {
        c.user_name = self.user_name;
        c.allow_privilege_escalation = self.allow_privilege_escalation;
        if self.bridge {
            c.network = NetworkMode::Bridge;
        }
        c.publish = self.publish;
        c.bandwidth = self.bandwidth;
        c.allow_from = self.allow_from;
    }

    /// The fields of each minor version are written only when one of them
    /// is set (those of 1.5 always): a spec that uses nothing of 1.7 has the
    /// bytes a 1.6 peer gives it, so its fingerprint survives an agent upgrade.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = postcard::to_allocvec(&(&self.user_name, self.allow_privilege_escalation)).unwrap_or_default();
        let v1_7 = (self.bridge, &self.publish, self.bandwidth, &self.allow_from);
        if v1_7 != (false, &Vec::new(), Bandwidth::default(), &None) {
            out.extend(postcard::to_allocvec(&v1_7).unwrap_or_default());
        }
        out
    }

    /// Reads a body from any 1.x peer: an older (shorter) one gets defaults
    /// for what it lacks, a newer one's extra fields are ignored.
    pub fn decode(body: &[u8]) -> Result<Self, postcard::Error> {
        let mut padded = Vec::with_capacity(body.len() + EXT_PADDING);
        padded.extend_from_slice(body);
        padded.resize(body.len() + EXT_PADDING, 0);
        postcard::take_from_bytes(&padded).map(|(ext, _)| ext)
    }
}

fn v1(w: &WorkloadSpec) -> WorkloadV1 {
    let c = &w.container;
    WorkloadV1 {
        name: w.name.clone(),
        revision: w.revision,
        image: w.image.clone(),
        image_digest: w.image_digest.clone(),
        health_deadline_s: w.health_deadline_s,
        container: ContainerV1 {
            command: c.command.clone(),
            args: c.args.clone(),
            env: c.env.clone(),
            working_dir: c.working_dir.clone(),
            user: c.user,
            hostname: c.hostname.clone(),
            resources: c.resources,
            restart: c.restart,
            backoff_cap_s: c.backoff_cap_s,
            mounts: c.mounts.clone(),
            devices: c.devices.clone(),
            // A bridged container travels as one with no network: a 1.6
            // agent must not put it on the host's (the extension says bridge).
            network: if c.network == NetworkMode::Bridge { NetworkMode::None } else { c.network },
            ports: c.ports.clone(),
            read_only_rootfs: c.read_only_rootfs,
            security: c.security.clone(),
            liveness: c.liveness.clone(),
            readiness: c.readiness.clone(),
            files: c.files.clone(),
        },
    }
}

fn from_v1(w: WorkloadV1) -> WorkloadSpec {
    let c = w.container;
    WorkloadSpec {
        name: w.name,
        revision: w.revision,
        image: w.image,
        image_digest: w.image_digest,
        health_deadline_s: w.health_deadline_s,
        container: ContainerSpec {
            command: c.command,
            args: c.args,
            env: c.env,
            working_dir: c.working_dir,
            user: c.user,
            hostname: c.hostname,
            resources: c.resources,
            restart: c.restart,
            backoff_cap_s: c.backoff_cap_s,
            mounts: c.mounts,
            devices: c.devices,
            // Bridge travels only in the extension: one said in the 1.4
            // layout (no 1.x encoder writes it there) reads as none, so
            // what is read encodes back to the same bytes.
            network: if c.network == NetworkMode::Bridge { NetworkMode::None } else { c.network },
            ports: c.ports,
            read_only_rootfs: c.read_only_rootfs,
            security: c.security,
            liveness: c.liveness,
            readiness: c.readiness,
            files: c.files,
            ..Default::default()
        },
    }
}

/// A workload's spec as the wire carries it: its 1.4 layout, then its
/// extension body when it has one. Equal specs give equal bytes, and a spec
/// that uses nothing from after 1.4 gives the bytes a 1.4 peer would (agents
/// fingerprint what runs with this: an upgrade must not look like a change).
pub fn workload_bytes(w: &WorkloadSpec) -> Vec<u8> {
    let mut bytes = postcard::to_allocvec(&v1(w)).unwrap_or_default();
    let ext = ContainerExt::of(&w.container);
    if ext != ContainerExt::default() {
        bytes.extend(ext.encode());
    }
    bytes
}

impl From<Desired> for DesiredV1 {
    fn from(d: Desired) -> Self {
        let extensions = d
            .workloads
            .iter()
            .map(|w| (w, ContainerExt::of(&w.container)))
            .filter(|(_, ext)| *ext != ContainerExt::default())
            .map(|(w, ext)| Extension { workload: w.name.clone(), body: ext.encode() })
            .collect();
        DesiredV1 {
            generation: d.generation,
            workloads: d.workloads.iter().map(v1).collect(),
            services: d.services,
            issued_ms: d.issued_ms,
            extensions,
            agent: d.agent,
            service_ports: d.service_ports,
            load_reports: d.load_reports,
            updates: d.updates,
        }
    }
}

impl TryFrom<DesiredV1> for Desired {
    type Error = String;

    fn try_from(d: DesiredV1) -> Result<Self, String> {
        let mut workloads: Vec<WorkloadSpec> = d.workloads.into_iter().map(from_v1).collect();
        for e in d.extensions {
            let ext = ContainerExt::decode(&e.body).map_err(|err| format!("extension of {}: {err}", e.workload))?;
            let w = workloads
                .iter_mut()
                .find(|w| w.name == e.workload)
                .ok_or_else(|| format!("an extension names {}, which the document does not have", e.workload))?;
            ext.apply(&mut w.container);
        }
        Ok(Desired {
            generation: d.generation,
            workloads,
            services: d.services,
            issued_ms: d.issued_ms,
            agent: d.agent,
            service_ports: d.service_ports,
            load_reports: d.load_reports,
            updates: d.updates,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extension_bodies_read_across_minor_versions() {
        let ext = ContainerExt {
            user_name: Some("app:staff".into()),
            allow_privilege_escalation: true,
            bridge: true,
            publish: vec![Publish { host_port: 8080, port: 80, protocol: PortProtocol::Tcp }],
            bandwidth: Bandwidth { egress_bps: 2_000_000, ingress_bps: 0 },
            allow_from: Some(vec!["web".into()]),
        };
        let body = ext.encode();
        assert_eq!(ContainerExt::decode(&body).unwrap(), ext);
        // A newer peer's extra field is ignored; an older peer's shorter body reads as defaults.
        let mut newer = body.clone();
        newer.extend([1, 2, 3]);
        assert_eq!(ContainerExt::decode(&newer).unwrap(), ext);
        assert_eq!(ContainerExt::decode(&[]).unwrap(), ContainerExt::default());
        assert!(ContainerExt::decode(&[1, 200]).is_err(), "a user name longer than the body must not read");
        // A 1.5 body (user name, escalation) reads with 1.7's fields at their defaults.
        let old = postcard::to_allocvec(&(Some("app".to_string()), true)).unwrap();
        let read = ContainerExt::decode(&old).unwrap();
        assert_eq!(
            (read.user_name.as_deref(), read.allow_privilege_escalation, read.bridge),
            (Some("app"), true, false)
        );
    }

    #[test]
    fn bridge_said_in_the_1_4_layout_reads_as_none_and_round_trips() {
        // Found by fuzzing: two workloads of one name, the second bridged in
        // its 1.4 layout, came back with the first one bridged.
        let mut w = WorkloadV1 { name: "a".into(), ..Default::default() };
        let plain = w.clone();
        w.container.network = NetworkMode::Bridge;
        let d = DesiredV1 { generation: 1, workloads: vec![plain, w], ..Default::default() };
        let read = Desired::try_from(d).unwrap();
        assert!(read
            .workloads
            .iter()
            .all(|w| w.container.network == NetworkMode::None || w.container.network == NetworkMode::Host));
        let again = Desired::try_from(DesiredV1::from(read.clone())).unwrap();
        assert_eq!(again, read);
    }

    #[test]
    fn a_bridged_container_reads_as_one_with_no_network_on_the_1_4_layout() {
        let mut w = WorkloadSpec { name: "a".into(), revision: 1, image: "x".into(), ..Default::default() };
        w.container.network = NetworkMode::Bridge;
        w.container.publish = vec![Publish { host_port: 8080, port: 80, protocol: PortProtocol::Tcp }];
        assert_eq!(v1(&w).container.network, NetworkMode::None);
        let d = Desired { generation: 1, workloads: vec![w.clone()], ..Default::default() };
        let back = Desired::try_from(DesiredV1::from(d)).unwrap();
        assert_eq!(back.workloads, vec![w]);
    }

    #[test]
    fn a_spec_without_new_fields_has_its_1_4_bytes() {
        let mut w = WorkloadSpec { name: "a".into(), revision: 3, image: "x".into(), ..Default::default() };
        let old = postcard::to_allocvec(&v1(&w)).unwrap();
        assert_eq!(workload_bytes(&w), old);
        w.container.allow_privilege_escalation = true;
        let with_1_5 = workload_bytes(&w);
        assert_ne!(with_1_5, old);
        // The 1.5 body alone, as a 1.6 peer encodes it: 1.7's fields add nothing.
        assert_eq!(with_1_5[old.len()..], postcard::to_allocvec(&(None::<String>, true)).unwrap()[..]);
    }
}
