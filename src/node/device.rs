//! The device source: where the node's block devices come from. The node asks it which device
//! holds a volume, to attach or release one, and who this node is; it never asks the
//! controller's storage API. The file pool's loop devices are one implementation
//! (`storage::filepool::devices`); a cloud backend would find its attached disks instead.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::error::Result;
use crate::host::{DevId, MountEntry};
use crate::storage::contract::{FormatGrant, PublishContext};
use crate::storage::Health;

/// What NodeGetInfo reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    /// 0 = no limit.
    pub max_volumes: u64,
    /// Topology segments of this node.
    pub segments: BTreeMap<String, String>,
}

/// A volume id the source accepted, with where its device comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRef {
    pub id: String,
    /// The source's own locator (the file pool: the image file).
    pub source: PathBuf,
}

/// A volume admitted for staging or publishing: the source checked the publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub volume: VolumeRef,
    /// The grant that applies: the context's, or the source's own when the request had none.
    pub grant: FormatGrant,
}

/// A block device on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub path: PathBuf,
    pub dev: DevId,
}

pub trait DeviceSource: Send + Sync {
    fn node_info(&self) -> &NodeInfo;
    /// Start-up duties (announcing this node to the backend, logging what is attached).
    fn start(&self) -> Result<()>;
    /// Validates an id: `NotFound` for one that cannot name a volume of this source. Touches
    /// nothing, so it is safe for teardown of volumes that are gone.
    fn volume(&self, id: &str) -> Result<VolumeRef>;
    /// Checks that the volume may be used on this node, from the publish context when the
    /// request carries one (`FailedPrecondition` when it is not usable here).
    fn admit(&self, id: &str, context: Option<&PublishContext>) -> Result<Admitted>;
    /// Whether the volume still exists behind its locator (`NotFound` replies of expand).
    fn exists(&self, volume: &VolumeRef) -> Result<bool>;
    /// The volume's live device on this node, if attached.
    fn find(&self, volume: &VolumeRef) -> Result<Option<Device>>;
    /// Every device of the volume, including ones whose backing is gone (teardown).
    fn all(&self, volume: &VolumeRef) -> Result<Vec<Device>>;
    fn attach(&self, volume: &VolumeRef) -> Result<Device>;
    /// Releases the volume's device; one already gone (or reused for another volume since it
    /// was listed) counts as released.
    fn release(&self, volume: &VolumeRef, device: &Device) -> Result<()>;
    /// Makes the device show the volume's current size.
    fn refresh_size(&self, volume: &VolumeRef, device: &Device) -> Result<()>;
    /// Whether `m` is on a device of this source that is no longer attached: such a mount can
    /// only return I/O errors and may be replaced.
    fn is_stale(&self, m: &MountEntry) -> Result<bool>;
    /// Whether the storage behind an attached volume is as it should be.
    fn condition(&self, volume: &VolumeRef, device: &Device) -> Health;
}

/// A device source for tests of the node logic: volumes are image paths in a directory,
/// attached as loop devices of a [`crate::host::fake::FakeHost`]; publication is a set.
#[cfg(test)]
pub mod fake {
    use std::collections::HashSet;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::error::Error;
    use crate::host::fake::FakeHost;
    use crate::host::{AttachOptions, Host, LoopDevice};

    pub struct FakeDevices {
        host: Arc<FakeHost>,
        dir: PathBuf,
        info: NodeInfo,
        volumes: Mutex<HashSet<String>>,
        published: Mutex<HashSet<String>>,
    }

    impl FakeDevices {
        pub fn new(host: Arc<FakeHost>, dir: PathBuf) -> FakeDevices {
            FakeDevices {
                host,
                dir,
                info: NodeInfo {
                    id: "n1".into(),
                    max_volumes: 0,
                    segments: Default::default(),
                },
                volumes: Default::default(),
                published: Default::default(),
            }
        }
        /// A volume that exists and, if `published`, is published to this node.
        pub fn create(&self, id: &str, published: bool) {
            self.volumes.lock().unwrap().insert(id.into());
            if published {
                self.published.lock().unwrap().insert(id.into());
            }
        }
        pub fn source(&self, id: &str) -> PathBuf {
            self.dir.join(format!("{id}.img"))
        }
        fn loops(&self, v: &VolumeRef) -> Result<Vec<LoopDevice>> {
            Ok(self
                .host
                .loop_devices()?
                .into_iter()
                .filter(|d| d.backing_file == v.source)
                .collect())
        }
    }

    fn device(d: &LoopDevice) -> Device {
        Device {
            path: d.path.clone(),
            dev: d.dev,
        }
    }

    impl DeviceSource for FakeDevices {
        fn node_info(&self) -> &NodeInfo {
            &self.info
        }
        fn start(&self) -> Result<()> {
            Ok(())
        }
        fn volume(&self, id: &str) -> Result<VolumeRef> {
            let ok = id.starts_with("vol-")
                && id.len() <= 64
                && id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-');
            if !ok {
                return Err(Error::NotFound(format!("volume {id:?}")));
            }
            Ok(VolumeRef {
                id: id.into(),
                source: self.source(id),
            })
        }
        fn admit(&self, id: &str, context: Option<&PublishContext>) -> Result<Admitted> {
            let volume = self.volume(id)?;
            let grant = match context {
                Some(c) => c.format,
                None if self.published.lock().unwrap().contains(id) => FormatGrant::Allowed,
                None => {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {id} is not published to node n1"
                    )))
                }
            };
            Ok(Admitted { volume, grant })
        }
        fn exists(&self, volume: &VolumeRef) -> Result<bool> {
            Ok(self.volumes.lock().unwrap().contains(&volume.id))
        }
        fn find(&self, volume: &VolumeRef) -> Result<Option<Device>> {
            Ok(self
                .loops(volume)?
                .iter()
                .find(|d| !d.backing_deleted)
                .map(device))
        }
        fn all(&self, volume: &VolumeRef) -> Result<Vec<Device>> {
            Ok(self.loops(volume)?.iter().map(device).collect())
        }
        fn attach(&self, volume: &VolumeRef) -> Result<Device> {
            let d = self.host.attach_loop(
                &volume.source,
                AttachOptions {
                    read_only: false,
                    direct_io: true,
                },
            )?;
            Ok(device(&d))
        }
        fn release(&self, volume: &VolumeRef, device: &Device) -> Result<()> {
            match self
                .loops(volume)?
                .into_iter()
                .find(|d| d.dev == device.dev)
            {
                Some(d) => Ok(self.host.detach_loop(&d)?),
                None => Ok(()),
            }
        }
        fn refresh_size(&self, volume: &VolumeRef, device: &Device) -> Result<()> {
            match self
                .loops(volume)?
                .into_iter()
                .find(|d| d.dev == device.dev)
            {
                Some(d) => Ok(self.host.refresh_loop_capacity(&d)?),
                None => Err(Error::FailedPrecondition("not attached".into())),
            }
        }
        fn is_stale(&self, m: &MountEntry) -> Result<bool> {
            Ok(m.dev.major == 7 && !self.host.loop_devices()?.iter().any(|d| d.dev == m.dev))
        }
        fn condition(&self, _volume: &VolumeRef, _device: &Device) -> Health {
            Health {
                abnormal: false,
                message: "fake".into(),
            }
        }
    }
}
