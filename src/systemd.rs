//! What systemd's `Type=notify` unit hears from the builder: READY=1 once
//! Redis and Docker answer, STATUS= with the running builds for `systemctl
//! status`, WATCHDOG=1 while the worker is alive, STOPPING=1 on shutdown.
//!
//! Each call is a no-op when `NOTIFY_SOCKET` is unset (not run by systemd).
//! A failed notification is logged and otherwise ignored: the builds matter
//! more than what systemd displays.

use sd_notify::NotifyState;

pub fn ready() {
    notify(&[NotifyState::Ready, NotifyState::Status("idle")]);
}

/// `building` lists the deployment ids of the running builds; `stopping`
/// says they are being drained.
pub fn status<S: AsRef<str>>(building: &[S], stopping: bool) {
    notify(&[NotifyState::Status(&describe(building, stopping))]);
}

pub fn watchdog() {
    notify(&[NotifyState::Watchdog]);
}

pub fn stopping() {
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping; finishing running builds"),
    ]);
}

fn describe<S: AsRef<str>>(building: &[S], stopping: bool) -> String {
    let activity = if building.is_empty() {
        "idle".to_owned()
    } else {
        let ids: Vec<&str> = building.iter().map(AsRef::as_ref).collect();
        format!("building {}: {}", ids.len(), ids.join(", "))
    };
    if stopping {
        format!("stopping; {activity}")
    } else {
        activity
    }
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_the_running_deployments() {
        assert_eq!(describe::<&str>(&[], false), "idle");
        assert_eq!(describe(&["dep_a", "dep_b"], false), "building 2: dep_a, dep_b");
        assert_eq!(describe(&["dep_a"], true), "stopping; building 1: dep_a");
    }
}
