//! The one way the shim locks shared state.
//!
//! [`Lock`] is a mutex whose guard is always handed out: a thread that
//! panicked while holding it leaves the data as it was at the panic, and the
//! shim keeps using it rather than silently skipping the update (which is
//! what `if let Ok(guard) = mutex.lock()` did — a created container could be
//! forgotten that way). The critical sections in the shim are short map and
//! field updates that leave the data consistent at every step, so the data
//! behind a poisoned lock is still right.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// A mutex that never refuses its guard.
#[derive(Debug, Default)]
pub struct Lock<T>(Mutex<T>);

impl<T> Lock<T> {
    /// A lock holding `value`.
    pub const fn new(value: T) -> Self {
        Lock(Mutex::new(value))
    }

    /// Locks, recovering the data of a poisoned lock.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_panic_while_locked_loses_no_update() {
        let l = Arc::new(Lock::new(vec![1]));
        let l2 = Arc::clone(&l);
        let _ = std::thread::spawn(move || {
            let mut g = l2.lock();
            g.push(2);
            panic!("while holding the lock");
        })
        .join();
        l.lock().push(3);
        assert_eq!(*l.lock(), vec![1, 2, 3]);
    }
}
