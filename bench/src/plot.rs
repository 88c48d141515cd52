//! The report's SVG plots (docs/bench-*.svg), drawn with `plotters` (SVG backend only: no
//! font files are read, the viewer lays out the text).
//!
//! Each plot is one or more charts in data coordinates: bar positions on a categorical axis are
//! fractions of a group (group `g` spans `g..g + 1`), values are req/s, ms, ratios, counts.

use std::error::Error;

use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::balance::Balance;
use crate::servers::Kind;
use crate::suites::{ScaleRow, Scaling, Timeline, Tput};
use crate::util::mmm;

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type Drawn = Result<(), Box<dyn Error>>;
/// (contender, median, min, max, ratio to the limit) of one bar.
type Bar = (Kind, f64, f64, f64, f64);
/// (bucket start s, p50 ms, max ms, ok, failed) of a timeline bucket.
type Bucket = (f64, f64, f64, u32, u32);
/// A scaling panel: title and (light, full) bar heights of a row.
type Panel<'a> = (&'a str, Box<dyn Fn(&ScaleRow) -> (f64, f64)>);

const GREY: RGBColor = RGBColor(0x88, 0x88, 0x88);
const LIGHT_GREY: RGBColor = RGBColor(0xc4, 0xc4, 0xc4);
const BLUE: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const LIGHT_BLUE: RGBColor = RGBColor(0x9e, 0xca, 0xe1);
const GREEN: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);
const PURPLE: RGBColor = RGBColor(0x94, 0x67, 0xbd);
const TEAL: RGBColor = RGBColor(0x17, 0xbe, 0xcf);
const RED: RGBColor = RGBColor(0xd6, 0x27, 0x28);
const FAIL: RGBColor = RGBColor(0xdd, 0x00, 0x00);
const SHADE: RGBColor = RGBColor(0xfd, 0xe9, 0xc8);
const GRID: RGBColor = RGBColor(0xee, 0xee, 0xee);
const FRAME: RGBColor = RGBColor(0x99, 0x99, 0x99);
const SEPARATOR: RGBColor = RGBColor(0xbb, 0xbb, 0xbb);

fn color(k: Kind) -> &'static RGBColor {
    match k {
        Kind::Limit => &GREY,
        Kind::Herdsman => &BLUE,
        Kind::Pm2 => &RED,
    }
}

fn bcolor(label: &str) -> &'static RGBColor {
    match label {
        "limit" => &GREY,
        "limit again" => &LIGHT_GREY,
        "shared" => &BLUE,
        "steer" => &GREEN,
        "sticky" => &PURPLE,
        "metrics" => &TEAL,
        _ => &RED,
    }
}

/// A text style: `px` is the rendered font size (the SVG backend writes `size / 1.24`).
fn font(px: f64, bold: bool, h: HPos, v: VPos) -> TextStyle<'static> {
    let f = ("sans-serif", px * 1.24).into_font();
    let f = if bold { f.style(FontStyle::Bold) } else { f };
    TextStyle::from(f).pos(Pos::new(h, v))
}

fn plain(px: f64) -> TextStyle<'static> {
    font(px, false, HPos::Left, VPos::Top)
}

fn bold(px: f64) -> TextStyle<'static> {
    font(px, true, HPos::Left, VPos::Top)
}

/// Centred above (`VPos::Bottom`) or below (`VPos::Top`) its point.
fn centred(px: f64, bold: bool, v: VPos) -> TextStyle<'static> {
    font(px, bold, HPos::Center, v)
}

/// Draws with `f` on a white `w` × `h` canvas and returns the SVG document.
fn render(w: u32, h: u32, f: impl FnOnce(&Area) -> Drawn) -> String {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        // Drawing into a String has no I/O to fail; an error here is a bug in the plot code.
        root.fill(&WHITE).expect("plot background");
        f(&root).expect("plot");
        root.present().expect("plot output");
    }
    svg
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
    let g = groups.len().max(1);
    let ymax = groups.iter().flat_map(|g| g.1.iter().map(|b| b.3)).fold(1.0, f64::max) * 1.1;
    // A group is 260 px: three 56 px bars every 72 px from 20 px in.
    let (lead, stride, width) = (20.0 / 260.0, 72.0 / 260.0, 56.0 / 260.0);
    render(160 + 260 * g as u32, 360, |root| {
        root.draw(&Text::new(
            "Throughput: req/s (median, whiskers min–max) and ratio to the limit",
            (70, 10),
            bold(15.0),
        ))?;
        let mut chart = ChartBuilder::on(root)
            .margin_top(50)
            .margin_right(90)
            .x_label_area_size(60)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..g as f64, 0.0..ymax)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_labels(6)
            .y_max_light_lines(0)
            .bold_line_style(GRID)
            .axis_style(WHITE)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .y_desc("requests / s")
            .label_style(plain(12.0))
            .axis_desc_style(plain(12.0))
            .draw()?;
        let pa = chart.plotting_area();
        for (gi, (label, bars)) in groups.iter().enumerate() {
            let gx = gi as f64 + lead;
            for (bi, (k, med, min, max, ratio)) in bars.iter().enumerate() {
                let x = gx + bi as f64 * stride;
                let cx = x + width / 2.0;
                pa.draw(&Rectangle::new([(x, 0.0), (x + width, *med)], color(*k).filled()))?;
                pa.draw(&PathElement::new(vec![(cx, *min), (cx, *max)], BLACK))?;
                pa.draw(
                    &(EmptyElement::at((cx, *max))
                        + Text::new(format!("{med:.0}"), (0, -16), centred(11.0, false, VPos::Bottom))
                        + Text::new(format!("{ratio:.2}×"), (0, -4), centred(11.0, true, VPos::Bottom))),
                )?;
                pa.draw(
                    &(EmptyElement::at((cx, 0.0))
                        + Text::new(k.name(), (0, 6), centred(12.0, false, VPos::Top))),
                )?;
            }
            pa.draw(
                &(EmptyElement::at((gx + 100.0 / 260.0, 0.0))
                    + Text::new(label.clone(), (0, 26), centred(12.0, true, VPos::Top))),
            )?;
        }
        Ok(())
    })
}

/// Latency over time across reloads, one panel per timeline: p50 and max per 100 ms
/// (log scale), failed requests as red bars, reload windows shaded.
pub fn timelines(tl: &[Timeline]) -> String {
    const PANEL: u32 = 230;
    let h = 40 + tl.len() as u32 * PANEL + 20;
    render(1000, h, |root| {
        root.draw(&Text::new(
            "Latency across reloads (per 100 ms: max grey, p50 coloured; failed requests red; reloads shaded)",
            (70, 8),
            bold(15.0),
        ))?;
        for (pi, t) in tl.iter().enumerate() {
            let area = root.clone().shrink((0, 40 + pi as u32 * PANEL), (1000, PANEL));
            area.draw(&Text::new(t.title.clone(), (70, 2), bold(12.0)))?;
            let tmax = t.buckets.last().map(|b| b.0 + 0.1).unwrap_or(1.0).max(1.0);
            // A label every second (every 5 s past 20 s).
            let every = if tmax > 20.0 { 5.0 } else { 1.0 };
            let fmax = t.buckets.iter().map(|b| b.4).max().unwrap_or(0).max(1) as f64;
            let total: u32 = t.buckets.iter().map(|b| b.4).sum();
            let (lo, hi) = (0.05, 5000.0);
            // Failed requests on a second, linear axis: a bar is 8 px + up to 40 px of the
            // 170 px panel for the busiest 100 ms.
            let mut chart = ChartBuilder::on(&area)
                .margin_top(20)
                .margin_right(30)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(
                    0.0..tmax,
                    (lo..hi).log_scale().with_key_points(vec![0.1, 1.0, 10.0, 100.0, 1000.0]),
                )?
                .set_secondary_coord(0.0..tmax, 0.0..fmax * 170.0 / 40.0);
            chart.draw_series(
                t.windows
                    .iter()
                    .map(|(a, b)| Rectangle::new([(*a, lo), (b.max(a + 0.02), hi)], SHADE.filled())),
            )?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .bold_line_style(RGBColor(0xe4, 0xe4, 0xe4))
                .axis_style(FRAME)
                .x_labels((tmax / every) as usize + 1)
                .x_label_formatter(&|s| format!("{s:.0} s"))
                .y_label_formatter(&|ms| format!("{ms} ms"))
                .label_style(plain(10.0))
                .draw()?;
            chart.draw_series(std::iter::once(Rectangle::new([(0.0, lo), (tmax, hi)], FRAME)))?;
            let line = |f: &dyn Fn(&Bucket) -> f64| -> Vec<(f64, f64)> {
                t.buckets.iter().filter(|b| b.3 > 0).map(|b| (b.0 + 0.05, f(b).clamp(lo, hi))).collect()
            };
            chart.draw_series(std::iter::once(PathElement::new(line(&|b| b.2), FRAME)))?;
            chart.draw_series(std::iter::once(PathElement::new(
                line(&|b| b.1),
                color(t.kind).stroke_width(2),
            )))?;
            chart.draw_secondary_series(t.buckets.iter().filter(|b| b.4 > 0).map(|b| {
                Rectangle::new([(b.0, 0.0), (b.0 + 0.1, fmax * 0.2 + b.4 as f64)], FAIL.mix(0.8).filled())
            }))?;
            chart.plotting_area().draw(
                &(EmptyElement::at((tmax, hi))
                    + Text::new(
                        format!(
                            "{total} failed requests (bar height ∝ failures per 100 ms, max {})",
                            fmax as u32
                        ),
                        (-6, 5),
                        font(12.0, false, HPos::Right, VPos::Top).color(&FAIL),
                    )),
            )?;
        }
        Ok(())
    })
}

/// Scaling: per-worker reload step and supervisor CPU per worker vs N.
pub fn scaling(sc: &Scaling) -> String {
    let rows: Vec<&ScaleRow> = sc.rows.iter().filter(|r| !r.step_ms.is_empty()).collect();
    let (w, h) = (860, 350);
    render(w, h, |root| {
        root.draw(&Text::new(
            "Roll-out cost per replaced worker vs N (tiny instantly-ready worker)",
            (20, 8),
            bold(15.0),
        ))?;
        let panels: [Panel; 2] = [
            (
                "roll-out ms per replaced worker (light: worker's own start)",
                Box::new(|r| (mmm(&r.own_ms).med, mmm(&r.step_ms).med)),
            ),
            ("supervisor CPU µs per replaced worker", Box::new(|r| (0.0, mmm(&r.cpu_us_per_worker).med))),
        ];
        for (pi, (title, f)) in panels.iter().enumerate() {
            let area = root.clone().shrink((40 + pi as u32 * 430, 50), (360, 244));
            area.draw(&Text::new(*title, (0, 2), bold(11.0)))?;
            let vals: Vec<(f64, f64)> = rows.iter().map(|r| f(r)).collect();
            let vmax = vals.iter().map(|v| v.1).fold(0.001, f64::max) * 1.2;
            let mut chart = ChartBuilder::on(&area)
                .margin_top(20)
                .x_label_area_size(24)
                .build_cartesian_2d(0.0..rows.len().max(1) as f64, 0.0..vmax)?;
            chart.configure_mesh().disable_mesh().disable_y_axis().x_labels(0).axis_style(FRAME).draw()?;
            let pa = chart.plotting_area();
            for (i, (r, (own, total))) in rows.iter().zip(&vals).enumerate() {
                let (x0, x1, cx) = (i as f64 + 0.2, i as f64 + 0.8, i as f64 + 0.5);
                pa.draw(&Rectangle::new([(x0, 0.0), (x1, *total)], BLUE.filled()))?;
                if *own > 0.0 {
                    pa.draw(&Rectangle::new([(x0, 0.0), (x1, *own)], LIGHT_BLUE.filled()))?;
                }
                let value = if *total >= 100.0 { format!("{total:.0}") } else { format!("{total:.2}") };
                pa.draw(
                    &(EmptyElement::at((cx, *total))
                        + Text::new(value, (0, -3), centred(11.0, false, VPos::Bottom))),
                )?;
                pa.draw(
                    &(EmptyElement::at((cx, 0.0))
                        + Text::new(format!("N={}", r.n), (0, 6), centred(12.0, false, VPos::Top))),
                )?;
            }
        }
        root.draw(&Text::new(
            format!(
                "fit over all reloads: reload = {:.2} ms + {:.3} ms × N; supervisor CPU = {:.0} µs + {:.0} µs × N",
                sc.fit_fixed_ms, sc.fit_per_worker_ms, sc.cpu_fit_fixed_us, sc.cpu_fit_per_worker_us
            ),
            (40, h as i32 - 14),
            font(12.0, false, HPos::Left, VPos::Bottom),
        ))?;
        Ok(())
    })
}

/// Balance modes: (a) data-path ratio to the limit, (b) failed requests per reload of the
/// warming app, (c) CPU-bound latency p50/p99/max and requests-per-worker min/max.
pub fn balance(b: &Balance) -> String {
    let labels = ["shared", "steer", "sticky", "PM2"];
    let tput_labels = ["limit again", "shared", "steer", "sticky", "metrics", "PM2"];
    let (w, h) = (1000u32, 1010u32);
    render(w, h, |root| {
        root.draw(&Text::new(
            "Balance modes: herdsman shared / steer / sticky vs the limit and PM2",
            (20, 10),
            bold(15.0),
        ))?;
        for (i, l) in
            ["limit", "limit again", "shared", "steer", "sticky", "metrics", "PM2"].iter().enumerate()
        {
            let x = 20 + i as i32 * 100;
            root.draw(&Rectangle::new([(x, 34), (x + 12, 46)], bcolor(l).filled()))?;
            root.draw(&Text::new(*l, (x + 16, 40), font(12.0, false, HPos::Left, VPos::Center)))?;
        }
        balance_tput(root, b, &tput_labels)?;
        balance_reloads(root, b, &labels)?;
        balance_cpu(root, b, h)
    })
}

/// (a) req/s over the limit's, per (N, client, mode) group: median bars, min–max whiskers.
fn balance_tput(root: &Area, b: &Balance, labels: &[&'static str]) -> Drawn {
    root.draw(&Text::new(
        format!(
            "Data path: req/s ÷ the limit's (median of cycles; whiskers min–max). wrk = one client address; multi = {} random addresses; even = {} consecutive",
            b.tput_sources.len(),
            b.even_sources.len()
        ),
        (60, 68),
        bold(12.0),
    ))?;
    let groups: Vec<(usize, bool, &str)> =
        b.ns.iter()
            .flat_map(|&n| {
                crate::balance::CLIENTS.into_iter().flat_map(move |c| [true, false].map(move |ka| (n, ka, c)))
            })
            .filter(|(n, ka, c)| b.tput.iter().any(|x| x.n == *n && x.keep_alive == *ka && x.client == *c))
            .collect();
    // Up to the largest whisker (at least 1.2, at most 4: beyond that the bar is clipped).
    let top = b.tput.iter().filter(|x| x.label != "limit").map(|x| mmm(&x.ratio).max).fold(0.0, f64::max);
    let ymax = (top * 1.08).clamp(1.2, 4.0);
    let gstep = if ymax > 2.0 { 0.5 } else { 0.25 };
    let ng = groups.len().max(1) as f64;
    let area = root.clone().shrink((0, 90), (w_of(root), 230));
    let mut chart = ChartBuilder::on(&area)
        .margin_right(40)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..ng, 0.0..ymax)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_labels((ymax / gstep) as usize + 1)
        .y_max_light_lines(1)
        .bold_line_style(GRID)
        .light_line_style(GRID)
        .axis_style(WHITE)
        .y_label_formatter(&|v| format!("{v:.2}"))
        .label_style(plain(12.0))
        .draw()?;
    let pa = chart.plotting_area();
    pa.draw(&DashedPathElement::new(vec![(0.0, 0.98), (ng, 0.98)], 4, 3, GREEN))?;
    pa.draw(
        &(EmptyElement::at((ng, 0.98))
            + Text::new("0.98 target", (-60, -3), font(10.0, false, HPos::Left, VPos::Bottom).color(&GREEN))),
    )?;
    // A group is 4 % padding each side and one bar per label, 2 % apart.
    let bw = 0.92 / labels.len() as f64;
    for (gi, (n, ka, client)) in groups.iter().enumerate() {
        let gx = gi as f64 + 0.04;
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
            let x = gx + bi as f64 * bw;
            let cx = x + (bw - 0.02) / 2.0;
            pa.draw(&Rectangle::new([(x, 0.0), (x + bw - 0.02, m.med.min(ymax))], bcolor(l).filled()))?;
            pa.draw(&PathElement::new(vec![(cx, m.min.min(ymax)), (cx, m.max.min(ymax))], BLACK))?;
            pa.draw(
                &(EmptyElement::at((cx, m.max.min(ymax)))
                    + Text::new(format!("{:.2}", m.med), (0, -3), centred(9.0, false, VPos::Bottom))),
            )?;
        }
        pa.draw(
            &(EmptyElement::at((gi as f64 + 0.5, 0.0))
                + Text::new(format!("N={n} {client}"), (0, 4), centred(11.0, false, VPos::Top))
                + Text::new(
                    if *ka { "keep-alive" } else { "new conn" },
                    (0, 17),
                    centred(11.0, false, VPos::Top),
                )),
        )?;
    }
    Ok(())
}

/// (b) failed requests per reload of the warming app, log scale with room for 0.
fn balance_reloads(root: &Area, b: &Balance, labels: &[&'static str]) -> Drawn {
    root.draw(&Text::new(
        format!(
            "Failed requests per reload, warming app (503 for 1 s), N={} (median; log scale)",
            b.reload_n
        ),
        (60, 348),
        bold(12.0),
    ))?;
    let area = root.clone().shrink((0, 370), (480, 230));
    let mut chart = ChartBuilder::on(&area).x_label_area_size(40).y_label_area_size(60).build_cartesian_2d(
        0.0..2.0,
        // log(1 + v): 0 failed sits on the axis.
        (0.0..10000.0).log_scale().zero_point(-1.0).with_key_points(vec![0.0, 10.0, 100.0, 1000.0, 10000.0]),
    )?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .bold_line_style(GRID)
        .axis_style(WHITE)
        .y_label_formatter(&|v| format!("{v}"))
        .label_style(plain(12.0))
        .draw()?;
    let pa = chart.plotting_area();
    // A group is 210 px: 38 px bars every 46 px from 10 px in.
    let (lead, stride, width) = (10.0 / 210.0, 46.0 / 210.0, 38.0 / 210.0);
    for (gi, ka) in [true, false].iter().enumerate() {
        let gx = gi as f64 + lead;
        for (bi, l) in labels.iter().enumerate() {
            let Some(c) = b.reloads.iter().find(|x| x.label == *l && x.cell.keep_alive == *ka) else {
                continue;
            };
            let m = mmm(&c.cell.failed);
            let x = gx + bi as f64 * stride;
            let cx = x + width / 2.0;
            let v = m.med.clamp(0.0, 10000.0);
            // At least a hairline for 0.
            pa.draw(&Rectangle::new([(x, 0.0), (x + width, v.max(0.1))], bcolor(l).filled()))?;
            pa.draw(
                &(EmptyElement::at((cx, v))
                    + Text::new(format!("{:.0}", m.med), (0, -4), centred(11.0, true, VPos::Bottom))),
            )?;
            pa.draw(&(EmptyElement::at((cx, 0.0)) + Text::new(*l, (0, 4), centred(10.0, false, VPos::Top))))?;
        }
        pa.draw(
            &(EmptyElement::at((gx + 90.0 / 210.0, 0.0))
                + Text::new(
                    if *ka { "keep-alive" } else { "new connection per request" },
                    (0, 18),
                    centred(12.0, true, VPos::Top),
                )),
        )?;
    }
    Ok(())
}

/// (c) CPU-bound latency p50 / p99 / max per contender row (log scale), labels and the
/// per-worker min/max under each row, the load averages at the bottom.
fn balance_cpu(root: &Area, b: &Balance, h: u32) -> Drawn {
    root.draw(&Text::new(
        format!(
            "CPU-bound /work?ms={} × {} clients, new conn per request: latency p50 / p99 / max (ms, log scale); below: requests per worker min/max",
            b.cpu_work_ms, b.cpu_conc
        ),
        (60, 638),
        bold(12.0),
    ))?;
    let rows = &b.cpu;
    let nr = rows.len().max(1) as f64;
    let area = root.clone().shrink((0, 660), (w_of(root), 310));
    let mut chart = ChartBuilder::on(&area)
        .margin_right(40)
        .x_label_area_size(70)
        .y_label_area_size(60)
        .build_cartesian_2d(
            0.0..nr,
            (1.0..1000.0).log_scale().with_key_points(vec![1.0, 10.0, 100.0, 1000.0]),
        )?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .bold_line_style(GRID)
        .axis_style(WHITE)
        .y_label_formatter(&|ms| format!("{ms} ms"))
        .label_style(plain(12.0))
        .draw()?;
    let pa = chart.plotting_area();
    // Three bars per row, at most 18 px each, 4 px in from the row's edge.
    let gw = 900.0 / nr;
    let bw = ((gw - 8.0) / 3.0).min(18.0) / gw;
    let pad = 4.0 / gw;
    let mut last_n = 0;
    for (i, c) in rows.iter().enumerate() {
        let gx = i as f64 + pad;
        if c.n != last_n {
            pa.draw(&(EmptyElement::at((gx, 1.0)) + Text::new(format!("N={}", c.n), (0, 47), bold(11.0))))?;
            if last_n != 0 {
                pa.draw(
                    &(EmptyElement::at((i as f64, 1000.0))
                        + PathElement::new(vec![(0, 0), (0, 300)], SEPARATOR)),
                )?;
            }
            last_n = c.n;
        }
        for (k, (v, op)) in [(c.p50, 1.0), (c.p99, 0.65), (c.max, 0.35)].iter().enumerate() {
            let x = gx + k as f64 * bw;
            let v = v.clamp(1.0, 1000.0);
            pa.draw(&Rectangle::new([(x, 1.0), (x + bw - 1.0 / gw, v)], bcolor(&c.label).mix(*op).filled()))?;
            let value = if v >= 10.0 { format!("{v:.0}") } else { format!("{v:.1}") };
            pa.draw(
                &(EmptyElement::at((x + bw / 2.0, v))
                    + Text::new(value, (0, -2), centred(8.0, false, VPos::Bottom))),
            )?;
        }
        let addr = if c.sources == 1 { "1 addr".to_string() } else { format!("{} addr", c.sources) };
        pa.draw(
            &(EmptyElement::at((gx + 1.5 * bw, 1.0))
                + Text::new(c.label.clone(), (0, 3), centred(10.0, false, VPos::Top))
                + Text::new(addr, (0, 16), centred(9.0, false, VPos::Top))
                + Text::new(format!("{:.2}", c.min_max), (0, 30), centred(10.0, true, VPos::Top))),
        )?;
    }
    root.draw(&Text::new(
        "bars per contender: p50 (solid), p99, max (lighter); load average (1, 5, 15 min) at the stages:",
        (60, h as i32 - 38),
        font(11.0, false, HPos::Left, VPos::Bottom),
    ))?;
    for (i, chunk) in b.loads.chunks(3).enumerate() {
        root.draw(&Text::new(
            chunk.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(" · "),
            (60, h as i32 - 24 + i as i32 * 12),
            font(10.0, false, HPos::Left, VPos::Bottom),
        ))?;
    }
    Ok(())
}

fn w_of(a: &Area) -> u32 {
    a.dim_in_pixel().0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Results;

    /// The text of every `<text>` element, unescaped.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.trim().to_string()))
            .map(|t| t.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
            .collect()
    }

    fn assert_shows(svg: &str, want: &[&str]) {
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "not an SVG document");
        let t = texts(svg);
        for w in want {
            assert!(t.iter().any(|x| x == w), "no label {w:?} in {t:?}");
        }
    }

    #[test]
    fn throughput_labels_every_bar_with_its_median_and_ratio() {
        let t: Tput = serde_json::from_str(
            r#"{"wrk_args": "wrk", "secs": 3, "rounds": 2, "rows": [
              {"n": 2, "keep_alive": true, "kind": "Limit", "rps": [100, 120], "ratio": [1, 1], "errors": [0]},
              {"n": 2, "keep_alive": true, "kind": "Herdsman", "rps": [99, 121], "ratio": [0.99, 1.01], "errors": [0]},
              {"n": 2, "keep_alive": false, "kind": "Pm2", "rps": [40], "ratio": [0.4], "errors": [0]}]}"#,
        )
        .unwrap();
        assert_shows(
            &throughput(&t),
            &[
                "110",
                "1.00×",
                "40",
                "0.40×",
                "limit",
                "herdsman",
                "PM2",
                "N=2, keep-alive",
                "N=2, new connection per request",
                "requests / s",
            ],
        );
    }

    #[test]
    fn timelines_have_a_panel_per_run_with_its_failure_count() {
        let tl: Vec<Timeline> = serde_json::from_str(
            r#"[{"title": "herdsman · instant app · N=2 · keep-alive", "kind": "Herdsman", "windows": [[0.5, 0.8]],
                 "buckets": [[0.0, 0.2, 3.0, 10, 0], [0.1, 0.3, 9.0, 8, 2], [0.2, 0.2, 4.0, 9, 5], [0.3, 0.0, 0.0, 0, 0]]},
                {"title": "PM2 · instant app · N=2 · keep-alive", "kind": "Pm2", "windows": [],
                 "buckets": [[0.0, 0.2, 3.0, 10, 0]]}]"#,
        )
        .unwrap();
        assert_shows(
            &timelines(&tl),
            &[
                "herdsman · instant app · N=2 · keep-alive",
                "PM2 · instant app · N=2 · keep-alive",
                "7 failed requests (bar height ∝ failures per 100 ms, max 5)",
                "0 failed requests (bar height ∝ failures per 100 ms, max 1)",
                "0.1 ms",
                "1000 ms",
                "0 s",
            ],
        );
    }

    #[test]
    fn scaling_shows_both_panels_per_size_and_the_fit() {
        let row = |n: usize, step: f64, cpu: f64| {
            format!(
                r#"{{"n": {n}, "startup_s": [], "startup_cpu_ms": [], "rss": 0, "idle_cpu_pct": 0, "reload_s": [],
                   "step_ms": [{step}], "own_ms": [0.2], "gap_ms": [], "overhead_ms": [], "cpu_us_per_worker": [{cpu}]}}"#
            )
        };
        let sc: Scaling = serde_json::from_str(&format!(
            r#"{{"bare_exec_ms": {{"med": 1, "min": 1, "max": 1, "n": 1}}, "rows": [{}, {}],
                "fit_fixed_ms": -1.5, "fit_per_worker_ms": 2.25, "cpu_fit_fixed_us": -600, "cpu_fit_per_worker_us": 900}}"#,
            row(1, 2.5, 801.0),
            row(8, 2.19, 99.5)
        ))
        .unwrap();
        assert_shows(
            &scaling(&sc),
            &[
                "N=1",
                "N=8",
                "2.50",
                "2.19",
                "801",
                "99.50",
                "fit over all reloads: reload = -1.50 ms + 2.250 ms × N; supervisor CPU = -600 µs + 900 µs × N",
            ],
        );
    }

    #[test]
    fn balance_from_the_committed_results_shows_every_measured_figure() {
        let r: Results = serde_json::from_str(include_str!("../results/results.json")).unwrap();
        let b = &r.balance;
        let svg = balance(b);
        let mut want: Vec<String> =
            vec!["0.98 target".into(), "keep-alive".into(), "new connection per request".into()];
        for x in b.tput.iter().filter(|x| x.label != "limit") {
            want.push(format!("{:.2}", mmm(&x.ratio).med));
        }
        for x in &b.reloads {
            want.push(format!("{:.0}", mmm(&x.cell.failed).med));
        }
        for c in &b.cpu {
            want.push(format!("{:.2}", c.min_max));
            for v in [c.p50, c.p99, c.max] {
                let v = v.clamp(1.0, 1000.0);
                want.push(if v >= 10.0 { format!("{v:.0}") } else { format!("{v:.1}") });
            }
        }
        assert_shows(&svg, &want.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    }
}
