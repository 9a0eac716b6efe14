//! Snapshot and clone cost on a reflink-capable pool, side by side with the data-copy fallback.
//! Needs root: it makes an XFS filesystem with reflink=1 on a loop device for the pool.
//! Run: `cargo bench --bench snapshot` (prints a table; it is a measurement, not a test).

use std::process::Command;
use std::time::{Duration, Instant};

use blockcsi::storage::filepool::copy::{self, Mode};
use blockcsi::storage::filepool::FilePool;
use blockcsi::storage::{
    AccessMode, AccessType, BlockStorage, Capability, NewVolume, Provisioning, VolumeSource,
};

const SIZE: u64 = 1 << 30;

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the snapshot benchmark needs root (loop devices, mkfs, mount)"
    );
    let work = tempfile::Builder::new()
        .prefix("blockcsi-bench-")
        .tempdir()
        .unwrap();
    let image = work.path().join("pool.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 << 30)
        .unwrap();
    let dev = sh("losetup", &["-f", "--show", image.to_str().unwrap()]);
    sh("mkfs.xfs", &["-q", "-K", "-m", "reflink=1", &dev]);
    let mnt = work.path().join("pool");
    std::fs::create_dir(&mnt).unwrap();
    sh("mount", &[&dev, mnt.to_str().unwrap()]);

    let result = std::panic::catch_unwind(|| run(&mnt));
    let _ = Command::new("umount").arg(&mnt).status();
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

fn run(mnt: &std::path::Path) {
    let pool = FilePool::open(&mnt.join("p")).unwrap();
    let cap = Capability {
        access: AccessType::Block,
        mode: AccessMode::SingleNodeWriter,
    };
    let new = |name: &str, source: Option<VolumeSource>| NewVolume {
        name: name.into(),
        required_bytes: SIZE,
        limit_bytes: 0,
        min_bytes: 0,
        capabilities: vec![cap.clone()],
        parameters: Default::default(),
        source,
        provisioning: Provisioning::Thin,
    };
    let vol = pool.create_volume(&new("bench-source", None)).unwrap();
    // Fill the whole GiB with data, as a volume in use would be.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(pool.image_path(&vol.id).unwrap())
            .unwrap();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let chunk: Vec<u8> = (0..(4 << 20))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for _ in 0..(SIZE / chunk.len() as u64) {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let src_image = pool.image_path(&vol.id).unwrap();

    let runs = 9;
    let mut snap = Vec::new();
    let mut clone = Vec::new();
    for i in 0..runs {
        let t = Instant::now();
        let s = pool.create_snapshot(&format!("snap-{i}"), &vol.id).unwrap();
        snap.push(t.elapsed());
        let t = Instant::now();
        let c = pool
            .create_volume(&new(
                &format!("clone-{i}"),
                Some(VolumeSource::Volume(vol.id.clone())),
            ))
            .unwrap();
        clone.push(t.elapsed());
        pool.delete_snapshot(&s.id).unwrap();
        pool.delete_volume(&c.id).unwrap();
    }
    let copy_runs = 3;
    let mut fallback = Vec::new();
    for i in 0..copy_runs {
        let dst = mnt.join(format!("copy-{i}.img"));
        // Drop cached pages so each copy reads from the device like the first one would.
        sh("sync", &[]);
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
        let t = Instant::now();
        let method = copy::copy_file(&src_image, &dst, Mode::DataCopyOnly).unwrap();
        fallback.push(t.elapsed());
        assert_eq!(method, copy::Method::DataCopy);
        std::fs::remove_file(&dst).unwrap();
    }
    let (s, c, f) = (median(snap), median(clone), median(fallback));
    println!("snapshot benchmark: 1 GiB volume full of data, XFS reflink pool on a loop device");
    println!("| operation | median | runs |");
    println!("|---|---|---|");
    println!("| CreateSnapshot (reflink) | {} | {runs} |", ms(s));
    println!(
        "| CreateVolume from volume (clone, reflink) | {} | {runs} |",
        ms(c)
    );
    println!(
        "| data-copy fallback of the same image | {} | {copy_runs} |",
        ms(f)
    );
    println!(
        "snapshot speed-up over the copy fallback: {:.0}x; clone: {:.0}x",
        f.as_secs_f64() / s.as_secs_f64(),
        f.as_secs_f64() / c.as_secs_f64()
    );
    pool.delete_volume(&vol.id).unwrap();
}
