//! The operator tools built into the binary: `ctl` (call a running driver), `doctor` (check a
//! node) and `bench` (measure). They depend on the driver core; the core never depends on them.

pub mod bench;
pub mod ctl;
pub mod doctor;

/// `1.0 GiB`, `512 MiB`, `4096 B`: binary units, as sizes are whole MiB in this driver.
pub fn human_bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v.abs() >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}
