//! The report: Markdown (`report.md`, also printed) and JSON (`report.json`)
//! built side by side, and the contender and scaling tables.

use std::fmt::Write as _;
use std::path::Path;

use crate::contenders::{Backup, Restore};

#[derive(Default)]
pub struct Report {
    pub md: String,
    pub json: serde_json::Map<String, serde_json::Value>,
}

/// One row of a contender table.
pub struct Row {
    pub label: String,
    /// Time in seconds, or why there is none.
    pub secs: Result<f64, String>,
    /// The limit with the same work (for `× limit`).
    pub limit: Option<f64>,
    /// mysnap's time for the same job (for `÷ mysnap`, peers only).
    pub mysnap: Option<f64>,
    pub size: Option<u64>,
    pub rss_mib: Option<f64>,
}

impl Row {
    pub fn new(label: impl Into<String>, secs: Result<f64, String>) -> Row {
        Row {
            label: label.into(),
            secs,
            limit: None,
            mysnap: None,
            size: None,
            rss_mib: None,
        }
    }
}

/// The figures measured again at each scale.
pub struct Core {
    pub data: u64,
    pub lock_hold: f64,
    pub stall: f64,
    pub tar_zstd: f64,
    pub backup: Backup,
    pub untar: f64,
    pub restore: Restore,
}

impl Report {
    /// A contender table; MB/s are of `bytes`.
    pub fn table(&mut self, rows: &[Row], bytes: u64) {
        let report = &mut self.md;
        writeln!(
            report,
            "| contender | time | MB/s | × limit | ÷ mysnap | output | peak RSS |\n|---|---|---|---|---|---|---|"
        )
        .unwrap();
        for r in rows {
            let opt = |v: Option<String>| v.unwrap_or_default();
            match &r.secs {
                Ok(s) => writeln!(
                    report,
                    "| {} | {s:.2} s | {:.0} | {} | {} | {} | {} |",
                    r.label,
                    bytes as f64 / 1e6 / s,
                    opt(r.limit.map(|l| format!("{:.2}", s / l))),
                    opt(r.mysnap.map(|m| format!("{:.2}", s / m))),
                    opt(r.size.map(|b| bytesize::ByteSize(b).to_string())),
                    opt(r.rss_mib.map(|m| format!("{m:.0} MiB"))),
                ),
                Err(e) => writeln!(report, "| {} | {e} | | | | | |", r.label),
            }
            .unwrap();
        }
    }

    /// The scaling table (1× → `scale`×), Markdown and JSON.
    pub fn scaling(&mut self, scale: u32, one: &Core, n: &Core) {
        writeln!(
            self.md,
            "\n## Scaling (1× → {scale}×)\n\n| figure | 1× ({}) | {scale}× ({}) | growth |\n|---|---|---|---|",
            bytesize::ByteSize(one.data),
            bytesize::ByteSize(n.data)
        )
        .unwrap();
        let rows: [(&str, f64, f64, &str); 9] = [
            (
                "lock hold median",
                one.lock_hold * 1e3,
                n.lock_hold * 1e3,
                "ms",
            ),
            ("writer stall median", one.stall * 1e3, n.stall * 1e3, "ms"),
            ("limit: tar \\| zstd", one.tar_zstd, n.tar_zstd, "s"),
            (
                "mysnap backup zstd → S3",
                one.backup.secs,
                n.backup.secs,
                "s",
            ),
            (
                "archiver peak RSS",
                one.backup.rss_mib,
                n.backup.rss_mib,
                "MiB",
            ),
            ("limit: zstd -dc \\| tar -x", one.untar, n.untar, "s"),
            (
                "mysnap restore S3 → answering",
                one.restore.secs,
                n.restore.secs,
                "s",
            ),
            (
                "restorer peak RSS",
                one.restore.rss_mib,
                n.restore.rss_mib,
                "MiB",
            ),
            (
                "server down during swap",
                one.restore.down,
                n.restore.down,
                "s",
            ),
        ];
        for (what, a, z, unit) in rows {
            writeln!(
                self.md,
                "| {what} | {a:.2} {unit} | {z:.2} {unit} | {:.2}× |",
                z / a
            )
            .unwrap();
        }
        self.json.insert(
            "scaling".into(),
            rows.iter()
                .map(|(w, a, z, u)| serde_json::json!({"figure": w, "one": a, "scaled": z, "unit": u}))
                .collect::<Vec<_>>()
                .into(),
        );
    }

    /// Prints the Markdown and writes `report.md` and `report.json` into `out`.
    pub fn finish(self, out: &Path) {
        print!("{}", self.md);
        std::fs::write(out.join("report.md"), &self.md).unwrap();
        std::fs::write(
            out.join("report.json"),
            serde_json::to_string_pretty(&serde_json::Value::Object(self.json)).unwrap(),
        )
        .unwrap();
    }
}

/// A contender table as JSON.
pub fn json_rows(rows: &[Row]) -> serde_json::Value {
    rows.iter()
        .map(|r| {
            serde_json::json!({
                "label": r.label,
                "secs": r.secs.as_ref().ok(),
                "error": r.secs.as_ref().err(),
                "limit_secs": r.limit,
                "mysnap_secs": r.mysnap,
                "size": r.size,
                "peak_rss_mib": r.rss_mib,
            })
        })
        .collect()
}
