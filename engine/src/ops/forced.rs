//! Forcing one of a kernel family's designs on the current thread, so tests and benches can run every design in
//! one process whatever the adapter would pick. Each family keeps its own thread-local cell (a `thread_local!`
//! is one per type); this is the shared set-run-restore around it.

use std::cell::Cell;
use std::thread::LocalKey;

/// Run `f` with `cell` set to `value` on this thread, restoring what it held before even if `f` panics.
pub(crate) fn with<T: Copy + 'static, R>(
    cell: &'static LocalKey<Cell<Option<T>>>,
    value: T,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore<T: Copy + 'static>(&'static LocalKey<Cell<Option<T>>>, Option<T>);
    impl<T: Copy + 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            self.0.set(self.1);
        }
    }
    let _restore = Restore(cell, cell.replace(Some(value)));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static CELL: Cell<Option<u8>> = const { Cell::new(None) };
    }

    #[test]
    fn forcing_nests_and_restores_even_after_a_panic() {
        assert_eq!(with(&CELL, 1, || with(&CELL, 2, || CELL.get())), Some(2));
        assert_eq!(CELL.get(), None);
        let caught = std::panic::catch_unwind(|| with(&CELL, 3, || panic!("inside")));
        assert!(caught.is_err());
        assert_eq!(CELL.get(), None, "a panicking test must not leave its design forced for the next");
    }
}
