//! Per-worker free lists of I/O buffers: a connection takes one when bytes arrive
//! or a response is written and gives it back once idle, so that idle connections
//! hold none and busy ones reuse warm memory (no allocation per request).

use std::cell::RefCell;

/// The size of a read buffer; a head that does not fit grows its own (up to the
/// head limit) and that one is not kept.
pub const READ_SIZE: usize = 4096;
/// Write buffers grown past this are not kept.
const WRITE_KEEP: usize = 64 * 1024;
/// Buffers kept per worker and kind: enough for the connections busy at once.
const KEEP: usize = 256;

thread_local! {
    static READ: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    static WRITE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A read buffer of `READ_SIZE` initialised bytes.
pub fn take_read() -> Vec<u8> {
    READ.with(|f| f.borrow_mut().pop())
        .unwrap_or_else(|| vec![0; READ_SIZE])
}

pub fn give_read(buf: Vec<u8>) {
    if buf.len() == READ_SIZE {
        READ.with(|f| {
            let mut free = f.borrow_mut();
            if free.len() < KEEP {
                free.push(buf);
            }
        });
    }
}

/// An empty write buffer.
pub fn take_write() -> Vec<u8> {
    WRITE
        .with(|f| f.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(READ_SIZE))
}

pub fn give_write(mut buf: Vec<u8>) {
    if buf.capacity() <= WRITE_KEEP {
        buf.clear();
        WRITE.with(|f| {
            let mut free = f.borrow_mut();
            if free.len() < KEEP {
                free.push(buf);
            }
        });
    }
}
