//! A spawned task that belongs to the value holding it.

use tokio::task::JoinHandle;

/// Aborts its task when dropped: the connection of a build that was
/// dropped, the session of a build that ended, a cache pull no build needs
/// any more. A bare `JoinHandle` would let the task run on.
pub struct AbortOnDrop<T>(pub JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    pub fn spawn<F>(task: F) -> AbortOnDrop<T>
    where
        F: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        AbortOnDrop(tokio::spawn(task))
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
