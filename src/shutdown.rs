//! Turns SIGTERM and SIGINT into a cancellation every task can watch.

use tokio::sync::watch;

/// A cloneable handle that tells tasks to stop. Tasks `select!` on
/// [`Shutdown::wait`]; the owner calls [`ShutdownTrigger::trigger`].
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// The sending half of [`Shutdown`].
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// A new trigger and the handle tasks watch.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    /// Tells every holder of a [`Shutdown`] to stop.
    pub fn trigger(&self) {
        let _ = self.0.send(true);
    }

    /// Another handle to watch.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    /// Resolves once shutdown was triggered (or the trigger was dropped).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// True once shutdown was triggered.
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }
}

/// Which signal asked the process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: an orchestrator asks the process to go.
    Terminate,
    /// SIGINT: Ctrl-C.
    Interrupt,
}

/// SIGTERM and SIGINT as one stream that listens from its creation on, so
/// that no signal is lost between two waits (a fresh [`signal`] call only
/// sees signals sent after it started listening). Create it before
/// anything can ask the process to stop; count signals with it.
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Starts listening for SIGTERM and SIGINT.
    pub fn listen() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal as unix_signal, SignalKind};
        Ok(Self {
            term: unix_signal(SignalKind::terminate())?,
            int: unix_signal(SignalKind::interrupt())?,
        })
    }

    /// The next signal, including one that arrived since the last call.
    pub async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Terminate,
            _ = self.int.recv() => Signal::Interrupt,
        }
    }
}

/// Waits for the next SIGTERM or SIGINT.
pub async fn signal() -> Signal {
    use tokio::signal::unix::{signal as unix_signal, SignalKind};
    let mut term = match unix_signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return Signal::Interrupt;
        }
    };
    tokio::select! {
        _ = term.recv() => Signal::Terminate,
        _ = tokio::signal::ctrl_c() => Signal::Interrupt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn trigger_wakes_every_handle() {
        let (trigger, mut a) = channel();
        let mut b = trigger.subscribe();
        assert!(!a.is_triggered());
        trigger.trigger();
        a.wait().await;
        b.wait().await;
        assert!(b.is_triggered());
    }

    #[tokio::test]
    async fn signals_sent_between_two_waits_are_not_lost() {
        let mut signals = Signals::listen().expect("signal handlers");
        // SAFETY: raise only sends a signal to this process, whose
        // handler tokio installed above.
        unsafe { libc::raise(libc::SIGTERM) };
        assert_eq!(signals.next().await, Signal::Terminate);
        unsafe { libc::raise(libc::SIGINT) };
        assert_eq!(signals.next().await, Signal::Interrupt);
    }
}
