//! `ListWorkers` in pages: the page sizes a head and its clients agree on,
//! the head's cut of one page, and the client loop that reads them all.
//!
//! A head with 20,000 workers lists about 700 KB of `WorkerInfo`s, ten
//! times the 64 KiB message limit that every Tether server keeps (see
//! [`crate::server::MAX_MESSAGE_BYTES`]). Rather than lift the limit for
//! one call, the listing is paged, ordered by worker id, and the token is
//! the last id returned: the head keeps no state between pages.

use crate::config::validate_id;
use crate::pb::head_service_client::HeadServiceClient;
use crate::pb::{ListWorkersRequest, ListWorkersResponse, WorkerInfo};
use prost::Message;
use tonic::transport::Channel;

/// Workers in a page when the request sets no `page_size` (documented in
/// `proto/tether/v1/tether.proto`).
pub const PAGE_DEFAULT: usize = 500;

/// The largest page; a larger `page_size` is cut to this (documented in
/// the proto).
pub const PAGE_MAX: usize = 1000;

/// Bytes of `WorkerInfo`s in one page: the message limit, less room for
/// `head_id` and `next_page_token` (at most 128-byte ids each) and their
/// framing. 1,000 workers with long ids and addresses would not fit; the
/// page is cut here instead of failing with OUT_OF_RANGE.
pub const PAGE_BYTES: usize = crate::server::MAX_MESSAGE_BYTES - 512;

/// Pages a client reads at most for one listing: a head answering with
/// ever-growing tokens must not keep it busy forever. 10,000 pages hold
/// far more workers than one head can.
pub const MAX_PAGES: usize = 10_000;

/// The head's side: one page for `request`. `list(after, limit)` returns
/// the first `limit` workers whose id sorts after `after`, ordered by id.
/// Returns the page and its `next_page_token`, or why the request is
/// invalid.
pub fn page(
    request: &ListWorkersRequest,
    list: impl FnOnce(&str, usize) -> Vec<WorkerInfo>,
) -> Result<(Vec<WorkerInfo>, String), String> {
    if !request.page_token.is_empty() {
        validate_id("page_token", &request.page_token)?;
    }
    let size = match request.page_size {
        0 => PAGE_DEFAULT,
        n => usize::try_from(n).unwrap_or(usize::MAX).min(PAGE_MAX),
    };
    // One more than asked tells whether another page follows.
    let mut workers = list(&request.page_token, size + 1);
    let mut more = workers.len() > size;
    workers.truncate(size);
    let fit = fitting(&workers, PAGE_BYTES);
    if fit < workers.len() {
        workers.truncate(fit);
        more = true;
    }
    let next_page_token = match workers.last() {
        Some(last) if more => last.worker_id.clone(),
        _ => String::new(),
    };
    Ok((workers, next_page_token))
}

/// How many of `workers`, from the first, encode within `budget` bytes as
/// the repeated field of a `ListWorkersResponse`.
fn fitting(workers: &[WorkerInfo], budget: usize) -> usize {
    let mut used = 0;
    workers
        .iter()
        .take_while(|w| {
            let len = w.encoded_len();
            // The field's tag (one byte) and length prefix, then the body.
            used += 1 + prost::encoding::encoded_len_varint(len as u64) + len;
            used <= budget
        })
        .count()
}

/// The client's side: every page of one head's listing, joined into one
/// answer (`next_page_token` empty). `request` wraps each page's message
/// (to add a deadline or a token). Fails with the first failing page's
/// status, or INTERNAL if the head's tokens stop advancing.
pub async fn list_all(
    client: &mut HeadServiceClient<Channel>,
    mut request: impl FnMut(ListWorkersRequest) -> tonic::Request<ListWorkersRequest>,
) -> Result<ListWorkersResponse, tonic::Status> {
    let mut all = ListWorkersResponse::default();
    for _ in 0..MAX_PAGES {
        let asked = ListWorkersRequest {
            page_size: PAGE_MAX as u32,
            page_token: std::mem::take(&mut all.next_page_token),
        };
        let previous = asked.page_token.clone();
        let page = client.list_workers(request(asked)).await?.into_inner();
        all.head_id = page.head_id;
        all.workers.extend(page.workers);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        if page.next_page_token <= previous {
            return Err(tonic::Status::internal(format!(
                "head {} answered page token {:?} after {previous:?}; tokens must grow",
                all.head_id, page.next_page_token
            )));
        }
        all.next_page_token = page.next_page_token;
    }
    Err(tonic::Status::internal(format!(
        "head {} listed more than {MAX_PAGES} pages",
        all.head_id
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(i: usize, addr_len: usize) -> WorkerInfo {
        WorkerInfo {
            worker_id: format!("w-{i:05}"),
            epoch: 1,
            attached_since_ms: 1_700_000_000_000,
            last_beat_ms: 1_700_000_000_000,
            worker_addr: "a".repeat(addr_len),
            last_sequence: 1_000_000,
            load: Some(0.5),
        }
    }

    /// A head's table of `n` workers, listed as `Attached::list` does.
    fn table(n: usize, addr_len: usize) -> impl Fn(&str, usize) -> Vec<WorkerInfo> {
        move |after, limit| {
            (0..n)
                .map(|i| worker(i, addr_len))
                .filter(|w| w.worker_id.as_str() > after)
                .take(limit)
                .collect()
        }
    }

    fn request(page_size: u32, page_token: &str) -> ListWorkersRequest {
        ListWorkersRequest {
            page_size,
            page_token: page_token.into(),
        }
    }

    #[test]
    fn an_empty_request_gets_the_first_page_of_the_default_size() {
        let (listed, next) = page(&ListWorkersRequest::default(), table(2000, 15)).unwrap();
        assert_eq!(listed.len(), PAGE_DEFAULT);
        assert_eq!(next, listed[PAGE_DEFAULT - 1].worker_id);
        let (listed, next) = page(&request(0, ""), table(10, 15)).unwrap();
        assert_eq!((listed.len(), next.as_str()), (10, ""));
    }

    #[test]
    fn page_sizes_are_capped_and_tokens_continue_after_the_last_id() {
        let (first, next) = page(&request(5000, ""), table(2500, 15)).unwrap();
        assert_eq!(first.len(), PAGE_MAX);
        let (second, next) = page(&request(5000, &next), table(2500, 15)).unwrap();
        assert_eq!(second[0].worker_id, "w-01000");
        let (third, next) = page(&request(5000, &next), table(2500, 15)).unwrap();
        assert_eq!((third.len(), next.as_str()), (500, ""));
    }

    #[test]
    fn a_page_of_large_workers_is_cut_to_the_message_limit() {
        // 1,000 workers with 256-byte addresses are ~300 KB.
        let (listed, next) = page(&request(1000, ""), table(1000, 256)).unwrap();
        let answer = ListWorkersResponse {
            head_id: "h".repeat(128),
            workers: listed,
            next_page_token: next.clone(),
        };
        assert!(answer.workers.len() < 1000 && !next.is_empty());
        assert!(
            answer.encoded_len() <= crate::server::MAX_MESSAGE_BYTES,
            "{} workers encode to {} bytes",
            answer.workers.len(),
            answer.encoded_len()
        );
        assert_eq!(next, answer.workers.last().unwrap().worker_id);
    }

    #[test]
    fn invalid_tokens_are_refused() {
        let e = page(&request(0, &"x".repeat(129)), table(1, 0)).unwrap_err();
        assert!(e.contains("page_token"), "{e}");
        assert!(page(&request(0, "w-\n"), table(1, 0)).is_err());
    }
}
