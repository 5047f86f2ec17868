//! Ctrl-C and SIGTERM handling: the first signal sets a flag that every benchmark loop checks between iterations, so
//! the bench stops early but still deletes its sandboxes, stops its server and removes its files; a second signal
//! exits at once.
//!
//! The signals are watched on a small thread with its own tokio runtime, so they are noticed even while the main
//! thread is blocked waiting for a peer runtime's process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context as _};

/// A shared "the user asked to stop" flag.
#[derive(Debug, Clone, Default)]
pub struct Interrupt {
    flag: Arc<AtomicBool>,
}

impl Interrupt {
    /// Starts watching for SIGINT and SIGTERM.
    pub fn install() -> anyhow::Result<Self> {
        let interrupt = Self::default();
        let flag = interrupt.flag.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the signal-watching runtime")?;
        // Register the handlers before returning, so no early signal is lost.
        let (mut int, mut term) = runtime.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            Ok::<_, std::io::Error>((signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?))
        })?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                runtime.block_on(async move {
                    loop {
                        tokio::select! {
                            _ = int.recv() => {}
                            _ = term.recv() => {}
                        }
                        if flag.swap(true, Ordering::SeqCst) {
                            eprintln!("second interrupt: exiting without cleaning up");
                            std::process::exit(130);
                        }
                        eprintln!(
                            "interrupted: finishing the current step, then cleaning up (interrupt again to exit now)"
                        );
                    }
                })
            })
            .context("starting the signal-watching thread")?;
        Ok(interrupt)
    }

    /// Whether a stop was requested.
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Fails when a stop was requested.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.is_set() {
            bail!("interrupted");
        }
        Ok(())
    }
}
