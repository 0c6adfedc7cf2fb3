//! Following one object until a condition holds, for every `--wait`:
//! the object is listed by name (which gives the version to watch from),
//! checked, then watched, each new version checked as it arrives. A watch
//! the server ends or expires (410) starts again from a fresh list, so a
//! change is never missed and nothing polls.

use std::time::Duration;

use futures::{Stream, StreamExt};
use serde_json::Value;

use crate::context::{Context, Failure, urlencode};
use crate::kinds::KindInfo;

/// What a check made of the object (None: it does not exist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// The condition holds.
    Done,
    /// Not yet; what was seen, for the timeout's message.
    Waiting(String),
    /// It never will (a VM that failed, say): stop with this message.
    Failed(String),
}

/// Follows `kind/name` in `project` until `check` says it is done or has
/// failed, or `timeout` passes (an error saying what was seen last).
pub async fn until(
    ctx: &Context,
    kind: &KindInfo,
    project: &str,
    name: &str,
    timeout: Duration,
    mut check: impl FnMut(Option<&Value>) -> Seen,
) -> Result<(), Failure> {
    let mut last = String::from("nothing seen yet");
    let followed = follow(ctx, kind, project, name, &mut check, &mut last);
    match tokio::time::timeout(timeout, followed).await {
        Ok(result) => result,
        Err(_) => {
            // What the object says of itself is most often the reason.
            let words = crate::diagnose::last_words(ctx, kind, project, name).await;
            Err(Failure::error(format!(
                "timed out after {}s waiting for {}/{name}: {last}\n{words}",
                timeout.as_secs(),
                kind.short()
            )))
        }
    }
}

async fn follow(
    ctx: &Context,
    kind: &KindInfo,
    project: &str,
    name: &str,
    check: &mut impl FnMut(Option<&Value>) -> Seen,
    last: &mut String,
) -> Result<(), Failure> {
    let by_name = format!("{}?fieldSelector={}", kind.collection(project), urlencode(&format!("metadata.name={name}")));
    let mut judge = |obj: Option<&Value>| match check(obj) {
        Seen::Done => Some(Ok(())),
        Seen::Failed(why) => Some(Err(Failure::error(why))),
        Seen::Waiting(seen) => {
            *last = seen;
            None
        }
    };
    loop {
        let list: Value = ctx.client.raw(reqwest::Method::GET, &by_name, None).await.map_err(|e| Failure::api(&e))?;
        if let Some(outcome) = judge(list["items"].as_array().and_then(|items| items.first())) {
            return outcome;
        }
        let rv = list["metadata"]["resourceVersion"].as_str().unwrap_or("0");
        let stream = match ctx.client.get_stream(&format!("{by_name}&watch=true&resourceVersion={rv}")).await {
            Ok(s) => s,
            // Expired between the list and the watch: list again.
            Err(e) if e.status() == Some(410) => continue,
            Err(e) => return Err(Failure::api(&e)),
        };
        let mut events = std::pin::pin!(events(stream));
        // A transport error ends this watch; the next list says whether
        // the apiserver is still there.
        while let Some(Ok(event)) = events.next().await {
            let obj = match event["type"].as_str() {
                Some("ADDED" | "MODIFIED") => Some(&event["object"]),
                Some("DELETED") => None,
                // An expired watch (or any error): start over from a list.
                Some("ERROR") => break,
                _ => continue,
            };
            if let Some(outcome) = judge(obj) {
                return outcome;
            }
        }
    }
}

/// Follows the objects of `kind` in `project` that `selector` (a label
/// selector; empty: all of them) picks, as a map from name to object,
/// until `check` of the whole set says it is done or has failed, or
/// `timeout` passes. `check` is also told the name of the object that
/// changed since its last call (`None` after a fresh list), so that it
/// can keep its own account rather than look at every object each time.
pub async fn until_all(
    ctx: &Context,
    kind: &KindInfo,
    project: &str,
    selector: &str,
    timeout: Duration,
    mut check: impl FnMut(&std::collections::BTreeMap<String, Value>, Option<&str>) -> Seen,
) -> Result<(), Failure> {
    let mut last = String::from("nothing seen yet");
    let followed = follow_all(ctx, kind, project, selector, &mut check, &mut last);
    match tokio::time::timeout(timeout, followed).await {
        Ok(result) => result,
        Err(_) => Err(Failure::error(format!(
            "timed out after {}s waiting for {} with {selector}: {last}",
            timeout.as_secs(),
            kind.plural
        ))),
    }
}

async fn follow_all(
    ctx: &Context,
    kind: &KindInfo,
    project: &str,
    selector: &str,
    check: &mut impl FnMut(&std::collections::BTreeMap<String, Value>, Option<&str>) -> Seen,
    last: &mut String,
) -> Result<(), Failure> {
    let picked = match selector {
        "" => kind.collection(project),
        s => format!("{}?labelSelector={}", kind.collection(project), urlencode(s)),
    };
    let and = if picked.contains('?') { '&' } else { '?' };
    let name_of = |o: &Value| o["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let mut judge =
        |objects: &std::collections::BTreeMap<String, Value>, changed: Option<&str>| match check(objects, changed) {
            Seen::Done => Some(Ok(())),
            Seen::Failed(why) => Some(Err(Failure::error(why))),
            Seen::Waiting(seen) => {
                *last = seen;
                None
            }
        };
    loop {
        let list: Value = ctx.client.raw(reqwest::Method::GET, &picked, None).await.map_err(|e| Failure::api(&e))?;
        let mut objects: std::collections::BTreeMap<String, Value> =
            list["items"].as_array().into_iter().flatten().map(|o| (name_of(o), o.clone())).collect();
        if let Some(outcome) = judge(&objects, None) {
            return outcome;
        }
        let rv = list["metadata"]["resourceVersion"].as_str().unwrap_or("0");
        let stream = match ctx.client.get_stream(&format!("{picked}{and}watch=true&resourceVersion={rv}")).await {
            Ok(s) => s,
            Err(e) if e.status() == Some(410) => continue,
            Err(e) => return Err(Failure::api(&e)),
        };
        let mut events = std::pin::pin!(events(stream));
        while let Some(Ok(mut event)) = events.next().await {
            let object = event["object"].take();
            let name = name_of(&object);
            match event["type"].as_str() {
                Some("ADDED" | "MODIFIED") => {
                    objects.insert(name.clone(), object);
                }
                Some("DELETED") => {
                    objects.remove(&name);
                }
                Some("ERROR") => break,
                _ => continue,
            }
            if let Some(outcome) = judge(&objects, Some(&name)) {
                return outcome;
            }
        }
    }
}

/// The events of a watch response, one JSON document per line, until the
/// response ends; a transport error is passed on and ends the stream.
pub fn events<B: AsRef<[u8]>, E>(body: impl Stream<Item = Result<B, E>>) -> impl Stream<Item = Result<Value, E>> {
    let state = Some((Box::pin(body), Vec::<u8>::new()));
    futures::stream::unfold(state, |state| async move {
        let (mut body, mut buf) = state?;
        loop {
            if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                match serde_json::from_slice::<Value>(&line) {
                    Ok(event) => return Some((Ok(event), Some((body, buf)))),
                    Err(_) => continue,
                }
            }
            match body.next().await {
                Some(Ok(chunk)) => buf.extend_from_slice(chunk.as_ref()),
                Some(Err(e)) => return Some((Err(e), None)),
                None => return None,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_are_split_on_newlines_across_chunks() {
        let chunks: Vec<Result<&[u8], ()>> =
            vec![Ok(b"{\"type\":\"ADDED\"}\n{\"type\":"), Ok(b"\"MODIFIED\"}\nnot json\n{\"type\":\"DELETED\"}\n")];
        let seen: Vec<Result<Value, ()>> = events(futures::stream::iter(chunks)).collect().await;
        let types: Vec<&str> = seen.iter().map(|e| e.as_ref().unwrap()["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["ADDED", "MODIFIED", "DELETED"]);
    }
}
