//! The dashboard's page and its static files, compiled into the binary from `static/`, so
//! `flux` serves them from any working directory and with no network: uPlot is vendored, no
//! file is fetched from a CDN.

/// One embedded file.
#[derive(Debug)]
pub struct Asset {
    /// The URL path it is served at.
    pub path: &'static str,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its bytes.
    pub body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $file:literal, $content_type:literal) => {
        Asset { path: $path, content_type: $content_type, body: include_bytes!(concat!("../../static/", $file)) }
    };
}

/// Every file the dashboard serves.
pub const ASSETS: &[Asset] = &[
    asset!("/", "index.html", "text/html; charset=utf-8"),
    asset!("/app.js", "app.js", "text/javascript; charset=utf-8"),
    asset!("/style.css", "style.css", "text/css; charset=utf-8"),
    asset!("/vendor/uplot/uPlot.iife.min.js", "vendor/uplot/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    asset!("/vendor/uplot/uPlot.min.css", "vendor/uplot/uPlot.min.css", "text/css; charset=utf-8"),
    asset!("/vendor/uplot/LICENSE", "vendor/uplot/LICENSE", "text/plain; charset=utf-8"),
];

/// The file served at `path`, if any.
pub fn find(path: &str) -> Option<&'static Asset> {
    let path = if path == "/index.html" { "/" } else { path };
    ASSETS.iter().find(|asset| asset.path == path)
}
