//! Progress of an image pull or push on the terminal: one bar per layer, redrawn in place as events arrive, or — when
//! standard error is not a terminal — one plain line per finished layer, so logs stay readable.

use std::io::{IsTerminal as _, Write as _};

use nook_api::TransferEvent;

use crate::table;

/// Width of a bar in characters.
const BAR: usize = 30;

struct LayerLine {
    digest: String,
    size: u64,
    transferred: u64,
    state: &'static str,
}

/// Draws pull or push events on standard error.
pub struct TransferProgress {
    verb: &'static str,
    layers: Vec<LayerLine>,
    drawn: usize,
    terminal: bool,
}

impl TransferProgress {
    /// Progress on standard error, introduced with `verb` ("pulling"); bars only when it is a terminal.
    pub fn new(verb: &'static str) -> Self {
        Self {
            verb,
            layers: Vec::new(),
            drawn: 0,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// Shows one event.
    pub fn show(&mut self, event: &TransferEvent) {
        match event {
            TransferEvent::Resolved {
                reference,
                digest,
                layers,
            } => {
                let total: u64 = layers
                    .iter()
                    .filter(|layer| !layer.present)
                    .map(|layer| layer.size)
                    .sum();
                eprintln!(
                    "{} {reference} ({}, {} layers, {} to transfer)",
                    self.verb,
                    short(digest),
                    layers.len(),
                    table::bytes(total)
                );
                self.layers = layers
                    .iter()
                    .map(|layer| LayerLine {
                        digest: layer.digest.clone(),
                        size: layer.size,
                        transferred: if layer.present { layer.size } else { 0 },
                        state: if layer.present { "cached" } else { "waiting" },
                    })
                    .collect();
            }
            TransferEvent::Progress {
                layer,
                transferred,
                size,
            } => {
                if let Some(line) = self.line(layer) {
                    line.transferred = *transferred;
                    line.size = *size;
                    line.state = "downloading";
                }
            }
            TransferEvent::LayerDone { layer } if self.line(layer).is_none() => {
                // A push reports its layers as they land, before it knows the manifest.
                eprintln!("layer {} pushed", short(layer));
            }
            TransferEvent::LayerDone { layer } => {
                let terminal = self.terminal;
                if let Some(line) = self.line(layer) {
                    if line.state != "cached" {
                        line.state = "done";
                        line.transferred = line.size;
                    }
                    if !terminal {
                        eprintln!(
                            "layer {} {} ({})",
                            short(&line.digest),
                            line.state,
                            table::bytes(line.size)
                        );
                    }
                }
            }
            TransferEvent::Done { .. } | TransferEvent::Error { .. } => {}
        }
        self.draw();
    }

    fn line(&mut self, digest: &str) -> Option<&mut LayerLine> {
        self.layers.iter_mut().find(|line| line.digest == digest)
    }

    fn draw(&mut self) {
        if !self.terminal || self.layers.is_empty() {
            return;
        }
        let mut out = String::new();
        if self.drawn > 0 {
            out.push_str(&format!("\x1b[{}A", self.drawn));
        }
        for line in &self.layers {
            let filled = if line.size == 0 {
                BAR
            } else {
                ((line.transferred.min(line.size) as u128 * BAR as u128) / line.size as u128) as usize
            };
            out.push_str(&format!(
                "\r\x1b[2K{}  [{}{}]  {:>10} / {:<10} {}\n",
                short(&line.digest),
                "#".repeat(filled),
                ".".repeat(BAR - filled),
                table::bytes(line.transferred),
                table::bytes(line.size),
                line.state
            ));
        }
        self.drawn = self.layers.len();
        let mut stderr = std::io::stderr().lock();
        let _ = stderr.write_all(out.as_bytes());
        let _ = stderr.flush();
    }
}

/// `sha256:0123456789ab`.
fn short(digest: &str) -> String {
    digest.chars().take("sha256:".len() + 12).collect()
}
