//! What a ctl command prints: its answer as JSON and as text, and the plain-text table both
//! forms of every subcommand use.

use serde_json::Value;

use super::CtlError;

/// A command's answer in both forms.
pub struct Output {
    pub json: Value,
    pub text: String,
}

impl Output {
    pub(super) fn new(json: Value, text: String) -> Output {
        Output { json, text }
    }
}

/// A one-line answer: `text` plus a newline.
pub(super) fn done(json: Value, text: String) -> Result<Output, CtlError> {
    Ok(Output::new(json, text + "\n"))
}

/// `k=v,k=v`: topology segments on one line.
pub(super) fn segments<'a>(s: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    s.into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Left-aligned columns separated by two spaces; a header row when given. Without a header the
/// rows are key/value pairs.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let cols = rows
        .iter()
        .map(Vec::len)
        .chain(std::iter::once(header.len()))
        .max()
        .unwrap_or(0);
    let mut widths = vec![0; cols];
    let all = std::iter::once(header.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .filter(|h| !h.is_empty())
        .chain(rows.iter().cloned())
        .collect::<Vec<_>>();
    for row in &all {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &all {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if all.is_empty() || (rows.is_empty() && !header.is_empty()) {
        out.push_str("(none)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::human_bytes;

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1 << 30), "1 GiB");
        assert_eq!(human_bytes(1536 << 20), "1.5 GiB");
        assert_eq!(human_bytes(512 << 20), "512 MiB");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["A", "LONG HEADER"],
            &[
                vec!["xxxx".into(), "1".into()],
                vec!["y".into(), "2".into()],
            ],
        );
        assert_eq!(t, "A     LONG HEADER\nxxxx  1\ny     2\n");
        assert_eq!(table(&["A", "B"], &[]), "A  B\n(none)\n");
    }
}
