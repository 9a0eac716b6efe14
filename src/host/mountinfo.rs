//! The parser of `/proc/self/mountinfo` (see proc_pid_mountinfo(5)): one [`MountEntry`] a line,
//! with the kernel's octal escapes decoded. Paths are kept as raw bytes so a mount point that is
//! not UTF-8 still compares equal to the path the node built.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

use super::DevId;

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub parent_id: u32,
    /// `st_dev` of files in this mount: for a filesystem on a block device, that device.
    pub dev: DevId,
    /// The directory of the filesystem that is mounted here (`/` unless a bind of a subtree or a file).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`ro`, `nosuid`, `relatime`...).
    pub options: String,
    pub fs_type: String,
    pub source: String,
    /// Per-superblock options.
    pub super_options: String,
}

impl MountEntry {
    /// Whether this mount is read-only. Only the per-mount flag counts: a read-only bind of a
    /// read-write filesystem is read-only here.
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mountinfo line {line}: {reason}")]
pub struct ParseError {
    /// 1-based.
    pub line: usize,
    pub reason: String,
}

/// Parses mountinfo text. Escapes can still produce bytes that are not UTF-8 (`\377`), and those
/// survive in the paths; the real file should go through [`parse_bytes`], since the kernel prints
/// such bytes raw.
pub fn parse(text: &str) -> Result<Vec<MountEntry>, ParseError> {
    parse_bytes(text.as_bytes())
}

/// Parses mountinfo as the kernel wrote it: bytes, not necessarily UTF-8.
pub fn parse_bytes(data: &[u8]) -> Result<Vec<MountEntry>, ParseError> {
    data.split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.is_empty())
        .map(|(i, line)| {
            parse_line(line).map_err(|reason| ParseError {
                line: i + 1,
                reason,
            })
        })
        .collect()
}

fn parse_line(line: &[u8]) -> Result<MountEntry, String> {
    // Split on single spaces, not runs: every space inside a field is escaped, so an empty field
    // is a real (empty) value and must keep its position.
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    if fields.len() < 10 {
        return Err(format!(
            "expected at least 10 fields, found {}",
            fields.len()
        ));
    }
    // Optional fields (shared:N, master:N...) come in any number, ended by a lone "-".
    let sep = 6 + fields[6..]
        .iter()
        .position(|f| *f == b"-")
        .ok_or("no \"-\" separator after the optional fields")?;
    if fields.len() < sep + 4 {
        return Err("fewer than 3 fields after the \"-\" separator".into());
    }
    Ok(MountEntry {
        mount_id: number(fields[0], "mount id")?,
        parent_id: number(fields[1], "parent id")?,
        dev: dev_id(fields[2])?,
        root: path(fields[3], "root")?,
        mount_point: path(fields[4], "mount point")?,
        options: text(fields[5], "mount options")?,
        fs_type: text(fields[sep + 1], "filesystem type")?,
        source: String::from_utf8_lossy(&unescape(fields[sep + 2], "source")?).into_owned(),
        super_options: text(fields[sep + 3], "superblock options")?,
    })
}

fn number(field: &[u8], what: &str) -> Result<u32, String> {
    std::str::from_utf8(field)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad {what} {:?}", String::from_utf8_lossy(field)))
}

fn dev_id(field: &[u8]) -> Result<DevId, String> {
    let bad = || format!("bad device number {:?}", String::from_utf8_lossy(field));
    let colon = field.iter().position(|&b| b == b':').ok_or_else(bad)?;
    Ok(DevId {
        major: number(&field[..colon], "major").map_err(|_| bad())?,
        minor: number(&field[colon + 1..], "minor").map_err(|_| bad())?,
    })
}

fn path(field: &[u8], what: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(OsString::from_vec(unescape(field, what)?)))
}

fn text(field: &[u8], what: &str) -> Result<String, String> {
    String::from_utf8(field.to_vec()).map_err(|_| format!("{what} are not UTF-8"))
}

/// Decodes `\ooo` escapes. The kernel escapes every backslash it prints, so a backslash not
/// followed by three octal digits means this is not kernel output, and guessing could make two
/// different mount points look the same.
fn unescape(field: &[u8], what: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] != b'\\' {
            out.push(field[i]);
            i += 1;
            continue;
        }
        let digits = field
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .ok_or_else(|| format!("bad escape in {what}"))?;
        let value = digits
            .iter()
            .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
        out.push(u8::try_from(value).map_err(|_| format!("escape out of range in {what}"))?);
        i += 4;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    fn dev(major: u32, minor: u32) -> DevId {
        DevId { major, minor }
    }

    struct Want {
        mount_id: u32,
        parent_id: u32,
        dev: DevId,
        root: &'static [u8],
        mount_point: &'static [u8],
        options: &'static str,
        fs_type: &'static str,
        source: &'static str,
        super_options: &'static str,
        read_only: bool,
    }

    fn check(name: &str, input: &str, want: &[Want]) {
        let got = parse(input).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got.len(), want.len(), "{name}: entry count");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.mount_id, w.mount_id, "{name}: mount_id");
            assert_eq!(g.parent_id, w.parent_id, "{name}: parent_id");
            assert_eq!(g.dev, w.dev, "{name}: dev");
            assert_eq!(
                g.root.as_os_str(),
                OsStr::from_bytes(w.root),
                "{name}: root"
            );
            assert_eq!(
                g.mount_point.as_os_str(),
                OsStr::from_bytes(w.mount_point),
                "{name}: mount_point"
            );
            assert_eq!(g.options, w.options, "{name}: options");
            assert_eq!(g.fs_type, w.fs_type, "{name}: fs_type");
            assert_eq!(g.source, w.source, "{name}: source");
            assert_eq!(g.super_options, w.super_options, "{name}: super_options");
            assert_eq!(g.read_only(), w.read_only, "{name}: read_only");
        }
    }

    #[test]
    fn parses_valid_tables() {
        let cases: &[(&str, &str, &[Want])] = &[
            ("empty input", "", &[]),
            ("blank lines only", "\n\n", &[]),
            (
                "one optional field",
                "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard\n",
                &[Want {
                    mount_id: 27,
                    parent_id: 1,
                    dev: dev(254, 0),
                    root: b"/",
                    mount_point: b"/",
                    options: "rw,relatime",
                    fs_type: "ext4",
                    source: "/dev/vda",
                    super_options: "rw,discard",
                    read_only: false,
                }],
            ),
            (
                "no optional fields, no trailing newline",
                "812 27 7:3 / /var/lib/kubelet/stage ro,nosuid,relatime - xfs /dev/loop3 ro,attr2",
                &[Want {
                    mount_id: 812,
                    parent_id: 27,
                    dev: dev(7, 3),
                    root: b"/",
                    mount_point: b"/var/lib/kubelet/stage",
                    options: "ro,nosuid,relatime",
                    fs_type: "xfs",
                    source: "/dev/loop3",
                    super_options: "ro,attr2",
                    read_only: true,
                }],
            ),
            (
                "several optional fields",
                "40 31 0:38 / /sys/fs/cgroup/systemd rw,nosuid shared:9 master:2 propagate_from:1 unbindable - cgroup cgroup rw,name=systemd\n",
                &[Want {
                    mount_id: 40,
                    parent_id: 31,
                    dev: dev(0, 38),
                    root: b"/",
                    mount_point: b"/sys/fs/cgroup/systemd",
                    options: "rw,nosuid",
                    fs_type: "cgroup",
                    source: "cgroup",
                    super_options: "rw,name=systemd",
                    read_only: false,
                }],
            ),
            (
                "escapes in root, mount point and source",
                "90 27 7:0 /a\\040b /mnt/with\\040space\\011tab\\012nl\\134bs rw - ext4 /pool/my\\040image rw\n",
                &[Want {
                    mount_id: 90,
                    parent_id: 27,
                    dev: dev(7, 0),
                    root: b"/a b",
                    mount_point: b"/mnt/with space\ttab\nnl\\bs",
                    options: "rw",
                    fs_type: "ext4",
                    source: "/pool/my image",
                    super_options: "rw",
                    read_only: false,
                }],
            ),
            (
                "escape to a byte that is not UTF-8",
                "91 27 7:1 / /mnt/caf\\351 rw - ext4 /dev/loop1 rw\n",
                &[Want {
                    mount_id: 91,
                    parent_id: 27,
                    dev: dev(7, 1),
                    root: b"/",
                    mount_point: b"/mnt/caf\xe9",
                    options: "rw",
                    fs_type: "ext4",
                    source: "/dev/loop1",
                    super_options: "rw",
                    read_only: false,
                }],
            ),
            (
                "bind of a device node, 'ro' only inside another option",
                "24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,size=123k,mode=755\n\
                 95 24 0:6 /loop2 /pods/vol/dev rw,errors=ro - devtmpfs devtmpfs ro\n",
                &[
                    Want {
                        mount_id: 24,
                        parent_id: 27,
                        dev: dev(0, 6),
                        root: b"/",
                        mount_point: b"/dev",
                        options: "rw,relatime",
                        fs_type: "devtmpfs",
                        source: "devtmpfs",
                        super_options: "rw,size=123k,mode=755",
                        read_only: false,
                    },
                    Want {
                        mount_id: 95,
                        parent_id: 24,
                        dev: dev(0, 6),
                        root: b"/loop2",
                        mount_point: b"/pods/vol/dev",
                        options: "rw,errors=ro",
                        fs_type: "devtmpfs",
                        source: "devtmpfs",
                        super_options: "ro",
                        read_only: false,
                    },
                ],
            ),
            (
                "empty source keeps its position",
                "50 27 0:50 / /mnt/x rw - tmpfs  rw\n",
                &[Want {
                    mount_id: 50,
                    parent_id: 27,
                    dev: dev(0, 50),
                    root: b"/",
                    mount_point: b"/mnt/x",
                    options: "rw",
                    fs_type: "tmpfs",
                    source: "",
                    super_options: "rw",
                    read_only: false,
                }],
            ),
        ];
        for (name, input, want) in cases {
            check(name, input, want);
        }
    }

    #[test]
    fn rejects_malformed_lines() {
        let cases: &[(&str, &str, usize)] = &[
            ("too few fields", "27 1 254:0 / / rw - ext4\n", 1),
            (
                "no separator",
                "27 1 254:0 / / rw shared:1 ext4 /dev/vda rw extra\n",
                1,
            ),
            (
                "separator too late",
                "27 1 254:0 / / rw a b c d - ext4 /dev/vda\n",
                1,
            ),
            ("bad mount id", "x 1 254:0 / / rw - ext4 /dev/vda rw\n", 1),
            (
                "device without colon",
                "27 1 2540 / / rw - ext4 /dev/vda rw\n",
                1,
            ),
            (
                "negative minor",
                "27 1 254:-1 / / rw - ext4 /dev/vda rw\n",
                1,
            ),
            (
                "short escape",
                "27 1 254:0 / /a\\04 rw - ext4 /dev/vda rw\n",
                1,
            ),
            (
                "non-octal escape",
                "27 1 254:0 / /a\\089 rw - ext4 /dev/vda rw\n",
                1,
            ),
            (
                "escape over 255",
                "27 1 254:0 / /a\\400 rw - ext4 /dev/vda rw\n",
                1,
            ),
            (
                "error reports the right line",
                "27 1 254:0 / / rw - ext4 /dev/vda rw\n\n27 1 254:0 / / rw\n",
                3,
            ),
        ];
        for (name, input, line) in cases {
            let err = parse(input).expect_err(name);
            assert_eq!(err.line, *line, "{name}: {err}");
        }
    }

    #[test]
    fn raw_non_utf8_bytes_survive() {
        let input = b"60 27 7:4 / /mnt/\xff\xfe rw - ext4 /dev/loop4 rw\n";
        let got = parse_bytes(input).unwrap();
        assert_eq!(got[0].mount_point.as_os_str().as_bytes(), b"/mnt/\xff\xfe");
    }
}
