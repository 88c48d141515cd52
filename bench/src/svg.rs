//! Hand-written SVG plots (no plotting library on the machine).

use std::fmt::Write;

use crate::balance::Balance;
use crate::servers::Kind;
use crate::suites::{Scaling, Timeline, Tput};
use crate::util::mmm;

/// (contender, median, min, max, ratio to the limit) of one bar.
type Bar = (Kind, f64, f64, f64, f64);
/// (bucket start s, p50 ms, max ms, ok, failed) of a timeline bucket.
type Bucket = (f64, f64, f64, u32, u32);
/// A scaling panel: title and (light, full) bar heights of a row.
type Panel<'a> = (&'a str, Box<dyn Fn(&crate::suites::ScaleRow) -> (f64, f64)>);

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn color(k: Kind) -> &'static str {
    match k {
        Kind::Limit => "#888888",
        Kind::Herdsman => "#1f77b4",
        Kind::Pm2 => "#d62728",
    }
}

fn header(w: f64, h: f64) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n"
    )
}

/// Grouped bars: req/s (median, min–max whisker) per contender, one group per (N, mode).
pub fn throughput(t: &Tput) -> String {
    let mut groups: Vec<(String, Vec<Bar>)> = Vec::new();
    let mut ns: Vec<usize> = t.rows.iter().map(|r| r.n).collect();
    ns.dedup();
    for n in ns {
        for ka in [true, false] {
            let label = format!("N={n}, {}", if ka { "keep-alive" } else { "new connection per request" });
            let mut bars = Vec::new();
            for k in [Kind::Limit, Kind::Herdsman, Kind::Pm2] {
                if let Some(r) = t.rows.iter().find(|r| r.n == n && r.keep_alive == ka && r.kind == k) {
                    let m = mmm(&r.rps);
                    bars.push((k, m.med, m.min, m.max, mmm(&r.ratio).med));
                }
            }
            groups.push((label, bars));
        }
    }
    let (w, h) = (160.0 + 260.0 * groups.len() as f64, 360.0);
    let (x0, y0, ph) = (70.0, 50.0, 250.0);
    let ymax = groups.iter().flat_map(|g| g.1.iter().map(|b| b.3)).fold(1.0, f64::max) * 1.1;
    let mut s = header(w, h);
    let _ = writeln!(s, "<text x=\"{}\" y=\"24\" font-size=\"15\" font-weight=\"bold\">Throughput: req/s (median, whiskers min–max) and ratio to the limit</text>", x0);
    // axis + grid
    let step = nice_step(ymax / 5.0);
    let mut v = 0.0;
    while v <= ymax {
        let y = y0 + ph - v / ymax * ph;
        let _ = writeln!(s, "<line x1=\"{x0}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>", w - 20.0, x0 - 6.0, y + 4.0, v as u64);
        v += step;
    }
    let _ = writeln!(
        s,
        "<text transform=\"translate(16,{}) rotate(-90)\" text-anchor=\"middle\">requests / s</text>",
        y0 + ph / 2.0
    );
    for (gi, (label, bars)) in groups.iter().enumerate() {
        let gx = x0 + 20.0 + gi as f64 * 260.0;
        for (bi, (k, med, min, max, ratio)) in bars.iter().enumerate() {
            let bx = gx + bi as f64 * 72.0;
            let y = y0 + ph - med / ymax * ph;
            let _ = writeln!(
                s,
                "<rect x=\"{bx:.1}\" y=\"{y:.1}\" width=\"56\" height=\"{:.1}\" fill=\"{}\"/>",
                y0 + ph - y,
                color(*k)
            );
            let (ya, yb) = (y0 + ph - max / ymax * ph, y0 + ph - min / ymax * ph);
            let _ = writeln!(
                s,
                "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{ya:.1}\" y2=\"{yb:.1}\" stroke=\"black\"/>",
                bx + 28.0,
                bx + 28.0
            );
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\">{:.0}</text>",
                bx + 28.0,
                ya - 16.0,
                med
            );
            let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\" font-weight=\"bold\">{:.2}×</text>", bx + 28.0, ya - 4.0, ratio);
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                bx + 28.0,
                y0 + ph + 16.0,
                k.name()
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" font-weight=\"bold\">{}</text>",
            gx + 100.0,
            y0 + ph + 36.0,
            esc(label)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn nice_step(x: f64) -> f64 {
    let p = 10f64.powf(x.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * p >= x {
            return m * p;
        }
    }
    10.0 * p
}

/// Latency over time across reloads, one panel per timeline: p50 and max per 100 ms
/// (log scale), failed requests as red bars, reload windows shaded.
pub fn timelines(tl: &[Timeline]) -> String {
    let (pw, ph) = (900.0, 170.0);
    let (x0, top) = (70.0, 40.0);
    let gap = 60.0;
    let h = top + tl.len() as f64 * (ph + gap) + 20.0;
    let w = x0 + pw + 30.0;
    let mut s = header(w, h);
    let _ = writeln!(s, "<text x=\"{x0}\" y=\"22\" font-size=\"15\" font-weight=\"bold\">Latency across reloads (per 100 ms: max <tspan fill=\"#555\">grey</tspan>, p50 coloured; failed requests red; reloads shaded)</text>");
    let (lmin, lmax) = (0.05f64.log10(), 5000f64.log10());
    for (pi, t) in tl.iter().enumerate() {
        let py = top + pi as f64 * (ph + gap) + 20.0;
        let tmax = t.buckets.last().map(|b| b.0 + 0.1).unwrap_or(1.0).max(1.0);
        let xs = |x: f64| x0 + x / tmax * pw;
        let ys = |ms: f64| py + ph - ((ms.max(0.05).log10() - lmin) / (lmax - lmin)).clamp(0.0, 1.0) * ph;
        let _ = writeln!(
            s,
            "<text x=\"{x0}\" y=\"{:.1}\" font-weight=\"bold\">{}</text>",
            py - 6.0,
            esc(&t.title)
        );
        for (a, b) in &t.windows {
            let _ = writeln!(
                s,
                "<rect x=\"{:.1}\" y=\"{py:.1}\" width=\"{:.1}\" height=\"{ph}\" fill=\"#fde9c8\"/>",
                xs(*a),
                (xs(*b) - xs(*a)).max(1.0)
            );
        }
        let _ = writeln!(
            s,
            "<rect x=\"{x0}\" y=\"{py:.1}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#999\"/>"
        );
        for ms in [0.1, 1.0, 10.0, 100.0, 1000.0] {
            let y = ys(ms);
            let _ = writeln!(s, "<line x1=\"{x0}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e4e4e4\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"10\">{ms} ms</text>", x0 + pw, x0 - 4.0, y + 3.0);
        }
        let mut sec = 0.0;
        while sec <= tmax {
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{sec:.0} s</text>",
                xs(sec),
                py + ph + 13.0
            );
            sec += if tmax > 20.0 { 5.0 } else { 1.0 };
        }
        let path = |f: &dyn Fn(&Bucket) -> f64| {
            let mut d = String::new();
            for b in t.buckets.iter().filter(|b| b.3 > 0) {
                let _ = write!(
                    d,
                    "{}{:.1},{:.1}",
                    if d.is_empty() { "M" } else { " L" },
                    xs(b.0 + 0.05),
                    ys(f(b))
                );
            }
            d
        };
        let _ =
            writeln!(s, "<path d=\"{}\" fill=\"none\" stroke=\"#999\" stroke-width=\"1\"/>", path(&|b| b.2));
        let _ = writeln!(
            s,
            "<path d=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"/>",
            path(&|b| b.1),
            color(t.kind)
        );
        let fmax = t.buckets.iter().map(|b| b.4).max().unwrap_or(0).max(1) as f64;
        let total: u32 = t.buckets.iter().map(|b| b.4).sum();
        for b in t.buckets.iter().filter(|b| b.4 > 0) {
            let hh = 8.0 + (b.4 as f64 / fmax) * 40.0;
            let _ = writeln!(s, "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{hh:.1}\" fill=\"#d00\" opacity=\"0.8\"/>", xs(b.0), py + ph - hh, (pw / tmax * 0.1).max(2.0));
        }
        let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#d00\">{total} failed requests (bar height ∝ failures per 100 ms, max {})</text>", x0 + pw - 6.0, py + 14.0, fmax as u32);
    }
    s.push_str("</svg>\n");
    s
}

/// Scaling: per-worker reload step and supervisor CPU per worker vs N.
pub fn scaling(sc: &Scaling) -> String {
    let rows: Vec<_> = sc.rows.iter().filter(|r| !r.step_ms.is_empty()).collect();
    let (w, h) = (860.0, 350.0);
    let mut s = header(w, h);
    let _ = writeln!(s, "<text x=\"20\" y=\"22\" font-size=\"15\" font-weight=\"bold\">Roll-out cost per replaced worker vs N (tiny instantly-ready worker)</text>");
    let panels: [Panel; 2] = [
        (
            "roll-out ms per replaced worker (light: worker's own start)",
            Box::new(|r| (mmm(&r.own_ms).med, mmm(&r.step_ms).med)),
        ),
        ("supervisor CPU µs per replaced worker", Box::new(|r| (0.0, mmm(&r.cpu_us_per_worker).med))),
    ];
    for (pi, (title, f)) in panels.iter().enumerate() {
        let (px, py, pw, ph) = (40.0 + pi as f64 * 430.0, 70.0, 360.0, 200.0);
        let vals: Vec<(f64, f64)> = rows.iter().map(|r| f(r)).collect();
        let vmax = vals.iter().map(|v| v.1).fold(0.001, f64::max) * 1.2;
        let _ = writeln!(
            s,
            "<text x=\"{px}\" y=\"{}\" font-weight=\"bold\" font-size=\"11\">{}</text>",
            py - 12.0,
            esc(title)
        );
        let _ = writeln!(
            s,
            "<line x1=\"{px}\" x2=\"{}\" y1=\"{}\" y2=\"{}\" stroke=\"#999\"/>",
            px + pw,
            py + ph,
            py + ph
        );
        let bw = pw / rows.len().max(1) as f64;
        for (i, (r, (own, total))) in rows.iter().zip(&vals).enumerate() {
            let bx = px + i as f64 * bw + bw * 0.2;
            let y = py + ph - total / vmax * ph;
            let _ = writeln!(
                s,
                "<rect x=\"{bx:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#1f77b4\"/>",
                bw * 0.6,
                py + ph - y
            );
            if *own > 0.0 {
                let yo = py + ph - own / vmax * ph;
                let _ = writeln!(
                    s,
                    "<rect x=\"{bx:.1}\" y=\"{yo:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#9ecae1\"/>",
                    bw * 0.6,
                    py + ph - yo
                );
            }
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\">{}</text>",
                bx + bw * 0.3,
                y - 4.0,
                if *total >= 100.0 { format!("{total:.0}") } else { format!("{total:.2}") }
            );
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">N={}</text>",
                bx + bw * 0.3,
                py + ph + 16.0,
                r.n
            );
        }
    }
    let _ = writeln!(
        s,
        "<text x=\"40\" y=\"{}\">fit over all reloads: reload = {:.2} ms + {:.3} ms × N; supervisor CPU = {:.0} µs + {:.0} µs × N</text>",
        h - 14.0,
        sc.fit_fixed_ms,
        sc.fit_per_worker_ms,
        sc.cpu_fit_fixed_us,
        sc.cpu_fit_per_worker_us
    );
    s.push_str("</svg>\n");
    s
}

fn bcolor(label: &str) -> &'static str {
    match label {
        "limit" => "#888888",
        "shared" => "#1f77b4",
        "steer" => "#2ca02c",
        "sticky" => "#9467bd",
        _ => "#d62728",
    }
}

/// Balance modes: (a) data-path ratio to the limit, (b) failed requests per reload of the
/// warming app, (c) CPU-bound latency p50/p99/max and requests-per-worker min/max.
pub fn balance(b: &Balance) -> String {
    let labels = ["shared", "steer", "sticky", "PM2"];
    let w = 1000.0;
    let h = 1010.0;
    let mut s = header(w, h);
    let _ = writeln!(
        s,
        "<text x=\"20\" y=\"24\" font-size=\"15\" font-weight=\"bold\">Balance modes: herdsman shared / steer / sticky vs the limit and PM2</text>"
    );
    // legend
    for (i, l) in ["limit", "shared", "steer", "sticky", "PM2"].iter().enumerate() {
        let x = 20.0 + i as f64 * 85.0;
        let _ = writeln!(
            s,
            "<rect x=\"{x}\" y=\"34\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"44\">{l}</text>",
            bcolor(l),
            x + 16.0
        );
    }

    // (a) ratio to the limit
    let (x0, py, pw, ph) = (60.0, 90.0, 900.0, 190.0);
    let _ = writeln!(s, "<text x=\"{x0}\" y=\"{}\" font-weight=\"bold\">Data path: req/s ÷ the limit's (median of cycles; whiskers min–max). wrk = one client address; multi = {} source addresses</text>", py - 14.0, b.tput_sources.len());
    let groups: Vec<(usize, bool, &str)> =
        b.ns.iter()
            .flat_map(|&n| {
                ["wrk", "multi"].into_iter().flat_map(move |c| [true, false].map(move |ka| (n, ka, c)))
            })
            .filter(|(n, ka, c)| b.tput.iter().any(|x| x.n == *n && x.keep_alive == *ka && x.client == *c))
            .collect();
    // Up to the largest whisker (at least 1.2, at most 4: beyond that the bar is clipped).
    let top = b.tput.iter().filter(|x| x.label != "limit").map(|x| mmm(&x.ratio).max).fold(0.0, f64::max);
    let ymax = (top * 1.08).clamp(1.2, 4.0);
    let ys = |v: f64| py + ph - (v.min(ymax) / ymax) * ph;
    let gstep = if ymax > 2.0 { 0.5 } else { 0.25 };
    let mut v = 0.0;
    while v <= ymax {
        let _ = writeln!(s, "<line x1=\"{x0}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.2}</text>", x0 + pw, ys(v), ys(v), x0 - 6.0, ys(v) + 4.0);
        v += gstep;
    }
    let _ = writeln!(s, "<line x1=\"{x0}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#2ca02c\" stroke-dasharray=\"4 3\"/><text x=\"{}\" y=\"{:.1}\" font-size=\"10\" fill=\"#2ca02c\">0.98 target</text>", x0 + pw, ys(0.98), ys(0.98), x0 + pw - 60.0, ys(0.98) - 3.0);
    let gw = pw / groups.len().max(1) as f64;
    let bw = (gw - 16.0) / labels.len() as f64;
    for (gi, (n, ka, client)) in groups.iter().enumerate() {
        let gx = x0 + gi as f64 * gw + 8.0;
        for (bi, l) in labels.iter().enumerate() {
            let Some(r) = b
                .tput
                .iter()
                .find(|x| x.n == *n && x.keep_alive == *ka && x.client == *client && x.label == *l)
            else {
                continue;
            };
            let m = mmm(&r.ratio);
            if m.n == 0 {
                continue;
            }
            let bx = gx + bi as f64 * bw;
            let _ = writeln!(
                s,
                "<rect x=\"{bx:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"/>",
                ys(m.med),
                bw - 2.0,
                py + ph - ys(m.med),
                bcolor(l)
            );
            let cx = bx + (bw - 2.0) / 2.0;
            let _ = writeln!(
                s,
                "<line x1=\"{cx:.1}\" x2=\"{cx:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>",
                ys(m.max),
                ys(m.min)
            );
            let _ = writeln!(
                s,
                "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"9\">{:.2}</text>",
                ys(m.max) - 3.0,
                m.med
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\">N={n} {client}</text><text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\">{}</text>",
            gx + (gw - 16.0) / 2.0,
            py + ph + 15.0,
            gx + (gw - 16.0) / 2.0,
            py + ph + 28.0,
            if *ka { "keep-alive" } else { "new conn" }
        );
    }

    // (b) failed per reload (log scale: 0, 1, 10, 100, 1000, 10000)
    let (py, pw2, ph) = (370.0, 420.0, 190.0);
    let _ = writeln!(s, "<text x=\"{x0}\" y=\"{}\" font-weight=\"bold\">Failed requests per reload, warming app (503 for 1 s), N={} (median; log scale)</text>", py - 14.0, b.reload_n);
    let lmax = 4.0;
    let yl = |v: f64| py + ph - ((1.0 + v).log10() / lmax).clamp(0.0, 1.0) * ph;
    for v in [0.0, 10.0, 100.0, 1000.0, 10000.0] {
        let _ = writeln!(s, "<line x1=\"{x0}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v}</text>", x0 + pw2, yl(v), yl(v), x0 - 6.0, yl(v) + 4.0);
    }
    for (gi, ka) in [true, false].iter().enumerate() {
        let gx = x0 + 10.0 + gi as f64 * 210.0;
        for (bi, l) in labels.iter().enumerate() {
            let Some(c) = b.reloads.iter().find(|x| x.label == *l && x.cell.keep_alive == *ka) else {
                continue;
            };
            let m = mmm(&c.cell.failed);
            let bx = gx + bi as f64 * 46.0;
            let y = yl(m.med);
            let _ = writeln!(
                s,
                "<rect x=\"{bx:.1}\" y=\"{y:.1}\" width=\"38\" height=\"{:.1}\" fill=\"{}\"/>",
                (py + ph - y).max(1.0),
                bcolor(l)
            );
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\" font-weight=\"bold\">{:.0}</text>",
                bx + 19.0,
                y - 4.0,
                m.med
            );
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" font-size=\"10\">{l}</text>",
                bx + 19.0,
                py + ph + 13.0
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" font-weight=\"bold\">{}</text>",
            gx + 90.0,
            py + ph + 30.0,
            if *ka { "keep-alive" } else { "new connection per request" }
        );
    }

    // (c) CPU-bound latency, log scale, p50 / p99 / max per row, min/max ratio under it
    let (py, ph) = (660.0, 240.0);
    let _ = writeln!(s, "<text x=\"{x0}\" y=\"{}\" font-weight=\"bold\">CPU-bound /work?ms={} × {} clients, new conn per request: latency p50 / p99 / max (ms, log scale); below: requests per worker min/max</text>", py - 14.0, b.cpu_work_ms, b.cpu_conc);
    let (lmin, lmax) = (0.0f64, 3.0f64); // 1 ms .. 1000 ms
    let yc = |ms: f64| py + ph - ((ms.max(1.0).log10() - lmin) / (lmax - lmin)).clamp(0.0, 1.0) * ph;
    for ms in [1.0, 10.0, 100.0, 1000.0] {
        let _ = writeln!(s, "<line x1=\"{x0}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{ms} ms</text>", x0 + pw, yc(ms), yc(ms), x0 - 6.0, yc(ms) + 4.0);
    }
    let rows = &b.cpu;
    let gw = pw / rows.len().max(1) as f64;
    let bw = ((gw - 8.0) / 3.0).min(18.0);
    let mut last_n = 0;
    for (i, c) in rows.iter().enumerate() {
        let gx = x0 + i as f64 * gw + 4.0;
        if c.n != last_n {
            let _ = writeln!(
                s,
                "<text x=\"{gx:.1}\" y=\"{}\" font-weight=\"bold\" font-size=\"11\">N={}</text>",
                py + ph + 58.0,
                c.n
            );
            if last_n != 0 {
                let _ = writeln!(
                    s,
                    "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{py}\" y2=\"{}\" stroke=\"#bbb\"/>",
                    gx - 4.0,
                    gx - 4.0,
                    py + ph + 60.0
                );
            }
            last_n = c.n;
        }
        for (k, (v, op)) in [(c.p50, 1.0), (c.p99, 0.65), (c.max, 0.35)].iter().enumerate() {
            let bx = gx + k as f64 * bw;
            let y = yc(*v);
            let _ = writeln!(
                s,
                "<rect x=\"{bx:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\" opacity=\"{op}\"/>",
                bw - 1.0,
                (py + ph - y).max(1.0),
                bcolor(&c.label)
            );
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"8\">{}</text>",
                bx + bw / 2.0,
                y - 2.0,
                if *v >= 10.0 { format!("{v:.0}") } else { format!("{v:.1}") }
            );
        }
        let cx = gx + 1.5 * bw;
        let _ = writeln!(
            s,
            "<text x=\"{cx:.1}\" y=\"{}\" text-anchor=\"middle\" font-size=\"10\">{}</text><text x=\"{cx:.1}\" y=\"{}\" text-anchor=\"middle\" font-size=\"9\">{}</text><text x=\"{cx:.1}\" y=\"{}\" text-anchor=\"middle\" font-size=\"10\" font-weight=\"bold\">{:.2}</text>",
            py + ph + 13.0,
            c.label,
            py + ph + 25.0,
            if c.sources == 1 { "1 addr".to_string() } else { format!("{} addr", c.sources) },
            py + ph + 40.0,
            c.min_max
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{x0}\" y=\"{}\" font-size=\"11\">bars per contender: p50 (solid), p99, max (lighter); load average (1, 5, 15 min) at the stages:</text>",
        h - 38.0
    );
    for (i, chunk) in b.loads.chunks(3).enumerate() {
        let _ = writeln!(
            s,
            "<text x=\"{x0}\" y=\"{}\" font-size=\"10\">{}</text>",
            h - 24.0 + i as f64 * 12.0,
            esc(&chunk.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(" · "))
        );
    }
    s.push_str("</svg>\n");
    s
}
