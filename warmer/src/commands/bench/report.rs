//! A bench's report: the breakdown by phase, markdown, svg and json files.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::*;

/// The Markdown table for `--out`.
/// Per-phase medians over runs (phases in the order they first appear).
pub(super) fn phases(runs: &[Vec<(String, f64)>]) -> Vec<Phase> {
    let mut names: Vec<&str> = Vec::new();
    for run in runs {
        for (name, _) in run {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    names
        .into_iter()
        .map(|name| {
            let samples: Vec<f64> = runs
                .iter()
                .map(|run| run.iter().find(|(n, _)| n == name).map_or(0.0, |(_, v)| *v))
                .collect();
            Phase {
                phase: name.to_string(),
                median_ms: Stats::of(&samples).median_ms,
            }
        })
        .collect()
}

pub fn markdown(r: &BenchReport) -> String {
    let row = |name: &str, s: &Stats| {
        format!(
            "| {name} | {:.1} | {:.1} | {:.1} |\n",
            s.median_ms, s.min_ms, s.max_ms
        )
    };
    let mut out = format!(
        "### {} ({} runs, image {:.0} MB, page cache {})\n\n",
        r.service,
        r.runs,
        r.image_bytes as f64 / 1e6,
        if r.drop_caches { "dropped" } else { "warm" }
    );
    out.push_str("| start to ready | median ms | min ms | max ms |\n|---|---|---|---|\n");
    out.push_str(&row("cold start", &r.cold));
    out.push_str(&row("warmer restore", &r.restore));
    out.push_str(&row("bare criu restore (as warmer)", &r.criu_restore));
    if let Some(s) = &r.criu_eager {
        out.push_str(&row("bare criu restore, eager", s));
    }
    if let Some(s) = &r.criu_lazy {
        out.push_str(&row("bare criu restore, lazy", s));
    }
    if !r.restore_kind.is_empty() {
        out.push_str(&format!("\nwarmer restored: {}.\n", r.restore_kind));
    }
    out.push_str(&format!(
        "\ncold / warmer restore: **{:.1}x**; warmer adds {:.1} ms to bare CRIU (median of per-round differences).\n\
         Machine: kernel {}, {} CPUs, CRIU {}, /run {}a tmpfs.\n",
        r.ratio,
        r.overhead_ms,
        r.machine.kernel,
        r.machine.cpus,
        r.machine.criu_version,
        if r.machine.run_dir_tmpfs { "" } else { "not " }
    ));
    if let Some(m) = &r.memory {
        out.push_str(&format!(
            "\nCRIU copied {:.1} MB into the tree before it ran (median; its `pages_restored`). This \
             machine copies pages from the page cache into fresh memory at {:.0} MB/s (the image's \
             largest file, {:.0} MB, in this bench): those {:.1} MB take at least {:.1} ms.\n",
            m.restored_mb, m.page_copy_mb_s, m.measured_mb, m.restored_mb, m.copy_ms
        ));
    }
    if let Some(d) = &r.disk {
        out.push_str(&format!(
            "\nThe disk, from each run's start to ready (the page cache dropped before it; medians; \
             the machine's whole disks). It reads {:.0} MB/s sequentially (the image's largest file, \
             {:.0} MB, in this bench):\n\n\
             | kind | read MB | reads | disk busy ms | busy share of the run | those MB at {:.0} MB/s |\n\
             |---|---|---|---|---|---|\n",
            d.sequential_mb_s, d.measured_mb, d.sequential_mb_s
        ));
        for k in &d.kinds {
            out.push_str(&format!(
                "| {} | {:.1} | {:.0} | {:.0} | {:.0}% | {:.0} ms |\n",
                k.kind,
                k.read_mb,
                k.reads,
                k.busy_ms,
                k.busy_share * 100.0,
                k.sequential_ms
            ));
        }
    }
    if r.show_breakdown && !r.breakdown.is_empty() {
        out.push_str("\nWhere a warmer restore's time goes (median per phase, from spawn to ready):\n\n| phase | ms |\n|---|---|\n");
        for p in &r.breakdown {
            out.push_str(&format!("| {} | {:.1} |\n", p.phase, p.median_ms));
        }
        let sum: f64 = r.breakdown.iter().map(|p| p.median_ms).sum();
        out.push_str(&format!("| (sum of medians) | {sum:.1} |\n"));
    }
    out
}

/// A small SVG: one row per kind, every run as a dot, the median as a bar.
pub fn svg(r: &BenchReport) -> String {
    let rows: Vec<(&str, &Vec<f64>, &str)> = [
        ("cold start", &r.samples.cold, "#c0392b"),
        ("warmer restore", &r.samples.restore, "#2471a3"),
        ("bare criu restore", &r.samples.criu_restore, "#7f8c8d"),
        ("bare criu, eager", &r.samples.criu_eager, "#a569bd"),
        ("bare criu, lazy", &r.samples.criu_lazy, "#52be80"),
    ]
    .into_iter()
    .filter(|(_, s, _)| !s.is_empty())
    .collect();
    let max = rows
        .iter()
        .flat_map(|(_, s, _)| s.iter().copied())
        .fold(1.0_f64, f64::max);
    let (left, width, row_h) = (150.0, 560.0, 44.0);
    let x = |ms: f64| left + ms / max * width;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"760\" height=\"{}\" font-family=\"sans-serif\" font-size=\"13\">\n\
         <text x=\"10\" y=\"20\" font-weight=\"bold\">{}: start to ready (ms), {} runs, image {:.0} MB, page cache {}</text>\n",
        60.0 + row_h * rows.len() as f64 + 30.0,
        r.service,
        r.runs,
        r.image_bytes as f64 / 1e6,
        if r.drop_caches { "dropped" } else { "warm" }
    );
    for (i, (name, samples, color)) in rows.iter().enumerate() {
        #[allow(clippy::cast_precision_loss)]
        let y = 50.0 + row_h * i as f64;
        let median = Stats::of(samples).median_ms;
        out.push_str(&format!(
            "<text x=\"10\" y=\"{:.0}\">{name}</text>\n<rect x=\"{left}\" y=\"{:.0}\" width=\"{:.1}\" height=\"18\" fill=\"{color}\" opacity=\"0.35\"/>\n<text x=\"{:.1}\" y=\"{:.0}\">{median:.1}</text>\n",
            y + 14.0,
            y,
            (x(median) - left).max(1.0),
            x(median) + 6.0,
            y + 14.0
        ));
        for s in samples.iter() {
            out.push_str(&format!(
                "<circle cx=\"{:.1}\" cy=\"{:.0}\" r=\"3\" fill=\"{color}\"/>\n",
                x(*s),
                y + 9.0
            ));
        }
    }
    #[allow(clippy::cast_precision_loss)]
    let axis_y = 50.0 + row_h * rows.len() as f64;
    out.push_str(&format!(
        "<line x1=\"{left}\" y1=\"{axis_y}\" x2=\"{}\" y2=\"{axis_y}\" stroke=\"black\"/>\n<text x=\"{left}\" y=\"{}\">0</text>\n<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{max:.0} ms</text>\n</svg>\n",
        left + width,
        axis_y + 16.0,
        left + width,
        axis_y + 16.0
    ));
    out
}

/// Writes `bench-<svc>.{md,svg,json}` into `dir`.
pub fn write_out(r: &BenchReport, dir: &Path) -> Result<Vec<PathBuf>, BenchError> {
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let mut written = Vec::new();
    for (ext, text) in [
        ("md", markdown(r)),
        ("svg", svg(r)),
        (
            "json",
            serde_json::to_string_pretty(r).expect("report serializes"),
        ),
    ] {
        let p = dir.join(format!("bench-{}.{ext}", r.service));
        let mut f = std::fs::File::create(&p).map_err(io(format!("writing {}", p.display())))?;
        f.write_all(text.as_bytes())
            .map_err(io(format!("writing {}", p.display())))?;
        written.push(p);
    }
    Ok(written)
}
