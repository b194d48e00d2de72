//! Positional I/O the standard library lacks: reads into fresh buffers without zero-filling
//! them first (the kernel writes the bytes and only what it wrote becomes part of the
//! buffer), and a write of two buffers in one system call.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Reads exactly `len` bytes of `file` at `offset` into a new buffer. Fails with
/// `UnexpectedEof` if the file ends first.
pub fn read_exact_at(file: &File, len: usize, offset: u64) -> io::Result<Vec<u8>> {
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let at = offset
            .checked_add(buf.len() as u64)
            .and_then(|at| libc::off_t::try_from(at).ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))?;
        let want = len - buf.len();
        // Only what is still wanted: the capacity may exceed `len`.
        let spare = &mut buf.spare_capacity_mut()[..want];
        // SAFETY: the pointer and length describe `spare`, memory `buf` owns and nothing
        // else refers to; pread writes at most that many bytes into it and reports how many.
        let read = unsafe {
            libc::pread(
                file.as_raw_fd(),
                spare.as_mut_ptr().cast::<libc::c_void>(),
                spare.len(),
                at,
            )
        };
        match read {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n if n > 0 => {
                // SAFETY: pread initialised the first `n` bytes of the spare capacity.
                unsafe { buf.set_len(buf.len() + n as usize) };
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(buf)
}

/// Writes `head` then `body` to `file` at `offset`, in one `pwritev` unless the kernel takes
/// less (then the rest follows). One system call instead of two for a record whose header
/// and payload live apart, without copying the payload into a record first.
pub(crate) fn write_pair_at(file: &File, head: &[u8], body: &[u8], offset: u64) -> io::Result<()> {
    let total = head.len() + body.len();
    let mut done = 0usize;
    while done < total {
        let at = offset
            .checked_add(done as u64)
            .and_then(|at| libc::off_t::try_from(at).ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))?;
        let (head_left, body_left) = unwritten(head, body, done);
        let parts = [
            libc::iovec {
                iov_base: head_left.as_ptr() as *mut libc::c_void,
                iov_len: head_left.len(),
            },
            libc::iovec {
                iov_base: body_left.as_ptr() as *mut libc::c_void,
                iov_len: body_left.len(),
            },
        ];
        // SAFETY: both iovecs describe live slices borrowed for the whole call; pwritev only
        // reads from them (the `*mut` is the C struct's type, nothing is written through it).
        let written = unsafe { libc::pwritev(file.as_raw_fd(), parts.as_ptr(), 2, at) };
        match written {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n if n > 0 => done += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// What is left of `head` then `body` once their first `done` bytes are written.
fn unwritten<'a>(head: &'a [u8], body: &'a [u8], done: usize) -> (&'a [u8], &'a [u8]) {
    if done < head.len() {
        (&head[done..], body)
    } else {
        (&head[..0], &body[done - head.len()..])
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn reads_exactly_the_range_and_refuses_past_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut file = File::create(&path).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        file.write_all(&data).unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(read_exact_at(&file, 100, 5000).unwrap(), &data[5000..5100]);
        assert_eq!(read_exact_at(&file, 0, 0).unwrap(), Vec::<u8>::new());
        assert_eq!(read_exact_at(&file, 10_000, 0).unwrap(), data);
        let past = read_exact_at(&file, 10, 9995).unwrap_err();
        assert_eq!(past.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_partial_write_resumes_at_the_first_unwritten_byte() {
        let (head, body) = (&b"head"[..], &b"body!"[..]);
        for done in 0..=head.len() + body.len() {
            let (h, b) = unwritten(head, body, done);
            let rest: Vec<u8> = h.iter().chain(b).copied().collect();
            let all: Vec<u8> = head.iter().chain(body).copied().collect();
            assert_eq!(rest, &all[done..], "after {done} bytes");
        }
    }

    #[test]
    fn a_pair_lands_whole_at_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        write_pair_at(&file, b"head", &body, 10).unwrap();
        write_pair_at(&file, b"", b"tail", 10 + 4 + body.len() as u64).unwrap();
        let all = std::fs::read(&path).unwrap();
        assert_eq!(&all[..10], &[0u8; 10]);
        assert_eq!(&all[10..14], b"head");
        assert_eq!(&all[14..14 + body.len()], &body[..]);
        assert_eq!(&all[14 + body.len()..], b"tail");
    }
}
