//! `bench.png`: horizontal bar charts of the contenders' times.

use std::path::Path;

use crate::report::Row;

/// Horizontal bar charts (backup, restore) of the contenders' times, each
/// bar labelled with its contender and time.
pub fn chart(path: &Path, sections: &[(&str, &[Row])]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        .map_err(|e| anyhow::anyhow!("DejaVuSans.ttf: {e} (apt-get install fonts-dejavu-core)"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into()))
        .map_err(|_| anyhow::anyhow!("DejaVuSans.ttf is not a usable font"))?;
    let heights: Vec<u32> = sections
        .iter()
        .map(|(_, rows)| 90 + 34 * rows.len() as u32)
        .collect();
    let root = BitMapBackend::new(path, (1200, heights.iter().sum::<u32>())).into_drawing_area();
    root.fill(&WHITE)?;
    let mut rest = root.clone();
    for ((title, rows), h) in sections.iter().zip(&heights) {
        let (area, below) = rest.split_vertically(*h);
        rest = below;
        let rows: Vec<(String, f64)> = rows
            .iter()
            .filter_map(|r| {
                let label = r.label.replace("\\|", "|").replace('`', "");
                r.secs.as_ref().ok().map(|s| (label, *s))
            })
            .collect();
        let longest = rows.iter().map(|r| r.1).fold(1.0, f64::max);
        // Room on the right of the longest bar for its label.
        let right = longest * 1.9;
        let mut c = ChartBuilder::on(&area)
            .caption(*title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(30)
            .build_cartesian_2d(0f64..right, 0f64..rows.len() as f64)?;
        c.configure_mesh()
            .disable_y_mesh()
            .disable_y_axis()
            .x_desc("seconds")
            .draw()?;
        for (i, (label, s)) in rows.iter().enumerate() {
            let y = (rows.len() - 1 - i) as f64;
            let color = if label.starts_with("mysnap") {
                BLUE.mix(0.7)
            } else if label.starts_with("limit") {
                BLACK.mix(0.35)
            } else {
                RED.mix(0.5)
            };
            c.draw_series([Rectangle::new(
                [(0.0, y + 0.15), (*s, y + 0.85)],
                color.filled(),
            )])?;
            c.draw_series([Text::new(
                format!("{s:.1} s  {label}"),
                (s + longest * 0.01, y + 0.7),
                ("sans-serif", 14),
            )])?;
        }
    }
    root.present()?;
    Ok(())
}
