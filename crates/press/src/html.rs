//! A self-contained HTML report: the uPlot chart library (MIT, vendored in `assets/`)
//! and the report's JSON are inlined, so the file opens offline.

use crate::report::Report;

const UPLOT_JS: &str = include_str!("../assets/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../assets/uPlot.min.css");

/// The page, with placeholders for the title, the chart library and the report.
const PAGE: &str = include_str!("../assets/report.html");

/// Renders the report as one HTML document with no external references.
pub fn render(report: &Report) -> String {
    let json = serde_json::to_string(report).expect("a report serialises");
    // Inside <script>, `</` would end the element early.
    let json = json.replace("</", "<\\/");
    let title = html_escape(&report.scenario);
    // Placeholders are filled in page order, so no inserted text is searched again.
    let mut out = String::with_capacity(PAGE.len() + UPLOT_JS.len() + json.len());
    let mut rest = PAGE;
    for (placeholder, value) in [
        ("__TITLE__", title.as_str()),
        ("__UPLOT_CSS__", UPLOT_CSS),
        ("__REPORT__", json.as_str()),
        ("__UPLOT_JS__", UPLOT_JS),
    ] {
        let at = rest.find(placeholder).expect("placeholder in page order");
        out.push_str(&rest[..at]);
        out.push_str(value);
        rest = &rest[at + placeholder.len()..];
    }
    out.push_str(rest);
    out
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::sample_report;

    #[test]
    fn the_page_is_self_contained_and_carries_the_report() {
        let mut report = sample_report();
        report.scenario = "</script><b>x __UPLOT_JS__".into();
        report.books.details.push("</script> in a detail".into());
        let html = render(&report);
        // Nothing fetched from elsewhere.
        for needle in ["src=\"http", "href=\"http", "src='http", "<link", "@import"] {
            assert!(!html.contains(needle), "external reference: {needle}");
        }
        assert!(html.contains("uPlot"), "the chart library is inlined");
        // The embedded JSON reads back and cannot close its script element.
        let start = html
            .find(r#"<script id="report" type="application/json">"#)
            .unwrap();
        let rest = &html[start..];
        let body_start = rest.find('>').unwrap() + 1;
        let body_end = rest.find("</script>").unwrap();
        let back: Report = serde_json::from_str(&rest[body_start..body_end]).unwrap();
        assert_eq!(back.scenario, "</script><b>x __UPLOT_JS__");
        assert_eq!(back.books.details.len(), 1);
        // Every placeholder was filled.
        assert!(!html.contains("__REPORT__") && !html.contains("__TITLE__"));
        assert!(html.contains(UPLOT_JS) && html.contains(UPLOT_CSS));
    }
}
