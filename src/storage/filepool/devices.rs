//! The file pool's device source: its volumes' images attached as loop devices on this node.
//! A loop device belongs to a volume when its backing file is the volume's image, by path or,
//! when sysfs shows the path cut short, by inode. The node registers itself in the pool at
//! start-up: the pool's attach limit counts against that record.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

use super::{is_volume_id, FilePool};
use crate::error::{Error, Result};
use crate::host::{AttachOptions, FileId, Host, LoopDevice, MountEntry};
use crate::node::device::{Admitted, Device, DeviceSource, NodeInfo, VolumeRef};
use crate::storage::contract::{FormatGrant, PublishContext};
use crate::storage::{BlockStorage, Health, Node, Timestamp};

/// The kernel's major number of loop devices.
const LOOP_MAJOR: u32 = 7;

pub struct PoolDevices {
    pool: Arc<FilePool>,
    host: Arc<dyn Host>,
    info: NodeInfo,
}

impl PoolDevices {
    pub fn new(
        pool: Arc<FilePool>,
        host: Arc<dyn Host>,
        node_id: String,
        max_volumes: u64,
    ) -> PoolDevices {
        let segments = [(crate::TOPOLOGY_KEY.to_string(), pool.pool_id().to_string())]
            .into_iter()
            .collect();
        PoolDevices {
            pool,
            host,
            info: NodeInfo {
                id: node_id,
                max_volumes,
                segments,
            },
        }
    }

    /// The image's path relative to the pool directory: what the publish context names.
    pub fn context_device(id: &str) -> String {
        format!("volumes/{id}.img")
    }

    fn image(&self, id: &str) -> PathBuf {
        self.pool.root().join(Self::context_device(id))
    }

    /// The volume whose image backs `dev`, if it is one of this pool's.
    fn volume_of_device(&self, dev: &LoopDevice) -> Option<String> {
        let id = dev.backing_file.file_stem()?.to_str()?;
        if !is_volume_id(id) {
            return None;
        }
        let image = self.image(id);
        let same = image == dev.backing_file
            || (dev.backing_id.is_some() && FileId::of(&image) == dev.backing_id);
        same.then(|| id.to_string())
    }

    /// The loop devices backed by `image`, including ones whose image was deleted: by path, or
    /// by inode when the path sysfs shows is cut short (the device was attached from a mount
    /// namespace that is gone, such as a previous node plugin container).
    fn loops_of(&self, image: &Path) -> Result<Vec<LoopDevice>> {
        let id = FileId::of(image);
        Ok(self
            .host
            .loop_devices()?
            .into_iter()
            .filter(|d| d.backing_file == image || (id.is_some() && d.backing_id == id))
            .collect())
    }

    fn live_loop(&self, image: &Path) -> Result<Option<LoopDevice>> {
        let loops = self.loops_of(image)?;
        if loops.iter().filter(|d| !d.backing_deleted).count() > 1 {
            warn!(image = %image.display(), "image is attached to several loop devices");
        }
        Ok(loops.into_iter().find(|d| !d.backing_deleted))
    }

    /// The loop device behind `device`, listed again: `None` when it is gone or now backs
    /// another image.
    fn loop_of(&self, volume: &VolumeRef, device: &Device) -> Result<Option<LoopDevice>> {
        Ok(self
            .loops_of(&volume.source)?
            .into_iter()
            .find(|d| d.dev == device.dev))
    }
}

fn device(d: &LoopDevice) -> Device {
    Device {
        path: d.path.clone(),
        dev: d.dev,
    }
}

impl DeviceSource for PoolDevices {
    fn node_info(&self) -> &NodeInfo {
        &self.info
    }

    /// Registers this node in the pool (so ControllerPublish knows it and its limit) and logs
    /// what the kernel says is attached and mounted from the pool.
    fn start(&self) -> Result<()> {
        self.pool.register_node(&Node {
            id: self.info.id.clone(),
            max_volumes: self.info.max_volumes,
            registered: Timestamp::now(),
        })?;
        let mounts = self.host.mounts()?;
        for dev in self.host.loop_devices()? {
            let Some(id) = self.volume_of_device(&dev) else {
                continue;
            };
            let at: Vec<String> = mounts
                .iter()
                .filter(|m| crate::node::uses_device(m, &device(&dev)))
                .map(|m| m.mount_point.display().to_string())
                .collect();
            info!(volume_id = %id, device = %dev.path.display(), mounts = ?at, deleted = dev.backing_deleted, "found attached volume");
        }
        Ok(())
    }

    fn volume(&self, id: &str) -> Result<VolumeRef> {
        if !is_volume_id(id) {
            return Err(Error::NotFound(format!("volume {id:?}")));
        }
        Ok(VolumeRef {
            id: id.to_string(),
            source: self.image(id),
        })
    }

    /// With a context, the controller's word: the device it names must be this volume's image
    /// in this pool, nothing else. Without one (an operator's call, a CO that skips
    /// ControllerPublish), the pool's own record must show the publication to this node.
    fn admit(&self, id: &str, context: Option<&PublishContext>) -> Result<Admitted> {
        let volume = self.volume(id)?;
        let grant = match context {
            Some(c) => {
                if let Some(d) = &c.device {
                    if *d != Self::context_device(id) {
                        return Err(Error::InvalidArgument(format!(
                            "publish context of volume {id} names device {:?}, not its image {:?}",
                            crate::error::clip(d, 64),
                            Self::context_device(id)
                        )));
                    }
                }
                c.format
            }
            None => {
                let record = self.pool.volume(id)?;
                if !record.attachments.contains_key(&self.info.id) {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {id} is not published to node {}",
                        self.info.id
                    )));
                }
                // The pool's records are the ledger: nothing the node cannot see.
                FormatGrant::Allowed
            }
        };
        Ok(Admitted { volume, grant })
    }

    fn exists(&self, volume: &VolumeRef) -> Result<bool> {
        match std::fs::symlink_metadata(&volume.source) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::Internal(format!(
                "stat {}: {e}",
                volume.source.display()
            ))),
        }
    }

    fn find(&self, volume: &VolumeRef) -> Result<Option<Device>> {
        Ok(self.live_loop(&volume.source)?.as_ref().map(device))
    }

    fn all(&self, volume: &VolumeRef) -> Result<Vec<Device>> {
        Ok(self.loops_of(&volume.source)?.iter().map(device).collect())
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
        match self.loop_of(volume, device)? {
            Some(d) => Ok(self.host.detach_loop(&d)?),
            None => Ok(()),
        }
    }

    fn refresh_size(&self, volume: &VolumeRef, device: &Device) -> Result<()> {
        let d = self.loop_of(volume, device)?.ok_or_else(|| {
            Error::FailedPrecondition(format!("volume {} is not staged on this node", volume.id))
        })?;
        Ok(self.host.refresh_loop_capacity(&d)?)
    }

    fn is_stale(&self, m: &MountEntry) -> Result<bool> {
        Ok(m.dev.major == LOOP_MAJOR && !self.host.loop_devices()?.iter().any(|d| d.dev == m.dev))
    }

    fn condition(&self, volume: &VolumeRef, device: &Device) -> Health {
        let abnormal = |message: String| Health {
            abnormal: true,
            message,
        };
        match self.loop_of(volume, device) {
            Ok(Some(d)) if d.backing_deleted => abnormal(format!(
                "the image of volume {} was deleted while attached",
                volume.id
            )),
            Ok(Some(_)) => match std::fs::metadata(&volume.source) {
                Ok(_) => Health {
                    abnormal: false,
                    message: "image present and attached".into(),
                },
                Err(e) => abnormal(format!(
                    "image of volume {} is not readable: {e}",
                    volume.id
                )),
            },
            Ok(None) => abnormal(format!("volume {} lost its loop device", volume.id)),
            Err(e) => abnormal(format!("cannot list loop devices: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;
    use crate::storage::{AccessMode, AccessType, Attachment, Capability, NewVolume};

    fn setup() -> (
        tempfile::TempDir,
        Arc<FilePool>,
        Arc<FakeHost>,
        PoolDevices,
        String,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let pool = Arc::new(FilePool::open(&dir.path().join("pool")).unwrap());
        let host = Arc::new(FakeHost::new());
        let devices = PoolDevices::new(pool.clone(), host.clone(), "n1".into(), 0);
        devices.start().unwrap();
        let v = pool
            .create_volume(&NewVolume {
                name: "v".into(),
                required_bytes: 1 << 20,
                limit_bytes: 0,
                min_bytes: 0,
                capabilities: vec![],
                parameters: Default::default(),
                source: None,
                provisioning: Default::default(),
            })
            .unwrap();
        (dir, pool, host, devices, v.id)
    }

    #[test]
    fn a_context_must_name_the_volumes_own_image() {
        let (_dir, _pool, host, devices, id) = setup();
        let ok = PublishContext {
            device: Some(PoolDevices::context_device(&id)),
            format: FormatGrant::Never,
        };
        let a = devices.admit(&id, Some(&ok)).unwrap();
        assert_eq!(a.grant, FormatGrant::Never);
        assert_eq!(a.volume.source, devices.image(&id));
        let derived = PublishContext {
            device: None,
            format: FormatGrant::Allowed,
        };
        assert_eq!(devices.admit(&id, Some(&derived)).unwrap().volume, a.volume);
        for bad in [
            "/etc/passwd".to_string(),
            format!("volumes/../volumes/{id}.img"),
            format!("snapshots/{id}.img"),
            "volumes/vol-00000000000000000000000000000000.img".to_string(),
            format!("/volumes/{id}.img"),
        ] {
            let c = PublishContext {
                device: Some(bad.clone()),
                format: FormatGrant::Allowed,
            };
            assert!(
                matches!(devices.admit(&id, Some(&c)), Err(Error::InvalidArgument(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            devices.admit("../x", Some(&ok)),
            Err(Error::NotFound(_))
        ));
        assert!(host.calls().is_empty(), "{:?}", host.call_log());
    }

    #[test]
    fn without_a_context_the_pool_record_must_show_the_publication() {
        let (_dir, pool, _host, devices, id) = setup();
        assert!(matches!(
            devices.admit(&id, None),
            Err(Error::FailedPrecondition(m)) if m.contains("not published")
        ));
        let cap = Capability {
            access: AccessType::Block,
            mode: AccessMode::SingleNodeWriter,
        };
        pool.attach(
            &id,
            "n1",
            &Attachment {
                read_only: false,
                capability: cap,
            },
        )
        .unwrap();
        assert_eq!(
            devices.admit(&id, None).unwrap().grant,
            FormatGrant::Allowed
        );
        assert!(matches!(
            devices.admit("vol-00000000000000000000000000000000", None),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn attach_find_release_round_trip_and_staleness() {
        let (_dir, _pool, host, devices, id) = setup();
        let v = devices.volume(&id).unwrap();
        assert!(devices.exists(&v).unwrap());
        assert_eq!(devices.find(&v).unwrap(), None);
        let d = devices.attach(&v).unwrap();
        assert_eq!(devices.find(&v).unwrap(), Some(d.clone()));
        assert_eq!(devices.all(&v).unwrap(), vec![d.clone()]);
        assert!(!devices.condition(&v, &d).abnormal);
        devices.refresh_size(&v, &d).unwrap();
        let mut mount = crate::host::mountinfo::parse("36 1 7:0 / /mnt rw - ext4 /dev/loop0 rw\n")
            .unwrap()
            .remove(0);
        mount.dev = d.dev;
        assert!(!devices.is_stale(&mount).unwrap());
        devices.release(&v, &d).unwrap();
        assert_eq!(devices.find(&v).unwrap(), None);
        assert!(devices.is_stale(&mount).unwrap());
        // Released twice is released.
        devices.release(&v, &d).unwrap();
        assert_eq!(host.count("detach_loop"), 1);
        // Another volume's device is never this one's.
        let other = devices
            .volume("vol-00000000000000000000000000000000")
            .unwrap();
        assert!(!devices.exists(&other).unwrap());
        let d2 = devices.attach(&v).unwrap();
        devices.release(&other, &d2).unwrap();
        assert_eq!(devices.find(&v).unwrap(), Some(d2));
    }
}
