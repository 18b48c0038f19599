//! The ONNX Runtime sessions of an `infer` stage, shared by its worker
//! threads.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use ort::session::Session;

/// Sessions shared by the worker threads; each run takes one for itself.
/// The first threads to run each own a session and take it whenever it is
/// free. With as many sessions as threads, each thread keeps its own, so a
/// session's buffers stay in the caches of the core its thread runs on.
pub struct SessionPool<S = Session> {
    /// Identifies the pool in the threads' records of their sessions.
    id: u64,
    free: Mutex<Free<S>>,
    returned: Condvar,
    pub size: usize,
}

struct Free<S> {
    /// Free sessions, with their slot numbers.
    sessions: Vec<(usize, S)>,
    /// Slots given to threads as their own so far: slots `0..owned`.
    owned: usize,
}

/// Source of [`SessionPool::id`].
static NEXT_POOL: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The slot this thread owns in each pool it ran in; `None` when the
    /// pool had none left to give.
    static OWN_SLOT: RefCell<Vec<(u64, Option<usize>)>> = const { RefCell::new(Vec::new()) };
}

impl<S> SessionPool<S> {
    pub fn new(sessions: Vec<S>) -> Self {
        let size = sessions.len();
        Self {
            id: NEXT_POOL.fetch_add(1, Ordering::Relaxed),
            free: Mutex::new(Free { sessions: sessions.into_iter().enumerate().collect(), owned: 0 }),
            returned: Condvar::new(),
            size,
        }
    }

    pub fn run<T>(&self, work: impl FnOnce(&mut S) -> T) -> T {
        let known = OWN_SLOT.with(|own| own.borrow().iter().find(|(pool, _)| *pool == self.id).map(|&(_, slot)| slot));
        let (slot, mut session) = {
            let mut free = self.free.lock().expect("a session pool lock is never poisoned by its users");
            let own = known.unwrap_or_else(|| {
                let slot = (free.owned < self.size).then_some(free.owned);
                free.owned += usize::from(slot.is_some());
                OWN_SLOT.with(|own| own.borrow_mut().push((self.id, slot)));
                slot
            });
            loop {
                let position = free.sessions.iter().position(|&(slot, _)| Some(slot) == own);
                if let Some(position) = position.or_else(|| free.sessions.len().checked_sub(1)) {
                    break free.sessions.swap_remove(position);
                }
                free = self.returned.wait(free).expect("a session pool lock is never poisoned by its users");
            }
        };
        let result = work(&mut session);
        self.free.lock().expect("a session pool lock is never poisoned by its users").sessions.push((slot, session));
        self.returned.notify_one();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_threads_keep_their_sessions() {
        // Two threads take turns. Each session remembers the thread of its
        // last run and counts the runs of another thread after it.
        let pool = SessionPool::new(vec![(0u32, None), (0u32, None)]);
        let turns = std::sync::Barrier::new(2);
        std::thread::scope(|scope| {
            for index in 0..2 {
                let (pool, turns) = (&pool, &turns);
                scope.spawn(move || {
                    let me = std::thread::current().id();
                    for round in 0..100 {
                        turns.wait();
                        if round % 2 == index {
                            pool.run(|(switches, last): &mut (u32, Option<std::thread::ThreadId>)| {
                                *switches += u32::from(last.is_some_and(|last| last != me));
                                *last = Some(me);
                            });
                        }
                    }
                });
            }
        });
        let free = pool.free.into_inner().unwrap();
        assert_eq!(free.sessions.len(), 2);
        assert!(free.sessions.iter().all(|(_, (switches, _))| *switches == 0), "a thread took the other's session");
    }
}
