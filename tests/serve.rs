//! `lambdachat serve` through HTTP, as a client sees it: the server runs in this process on the
//! tiny model (a free port on 127.0.0.1) and is driven with a plain HTTP client. Covered: the
//! responses' OpenAI shape, streaming, a continued conversation feeding only its new message,
//! stop sequences, the API key, 429 when the queue is full, a client that disconnects, and
//! errors in OpenAI's shape.

mod common;

use common::server::{Options, start};
use lambdachat::server;

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn post(url: &str, body: &Value) -> (u16, Value) {
    match ureq::post(url).send_json(body.clone()) {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("{e}"),
    }
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

#[test]
fn a_reply_and_a_continued_conversation() {
    let base = start(Options::default());
    let url = format!("{base}/v1/chat/completions");
    let first_messages = vec![
        json!({"role": "system", "content": "be brief"}),
        user("hello there"),
    ];
    let (status, first) = post(
        &url,
        &json!({"model": "any", "messages": first_messages, "max_tokens": 6}),
    );
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["object"], "chat.completion");
    assert_eq!(first["model"], "tiny");
    assert!(first["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &first["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let reply = choice["message"]["content"].as_str().unwrap().to_string();
    let usage = &first["usage"];
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=6).contains(&completion), "{usage}");
    if completion == 6 {
        assert_eq!(choice["finish_reason"], "length");
    }
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion
    );
    let ext = &usage["lambdachat"];
    assert_eq!(ext["continued"], false);
    assert_eq!(ext["tokens_reused"], 0);
    let first_fed = ext["tokens_fed"].as_u64().unwrap();
    assert!(ext["prefill_s"].as_f64().unwrap() > 0.0, "{ext}");
    let (decode_s, rate) = (
        ext["decode_s"].as_f64().unwrap(),
        ext["decode_tok_s"].as_f64().unwrap(),
    );
    assert!(
        decode_s > 0.0 && (rate * decode_s - completion as f64).abs() < 1e-3 * completion as f64,
        "{ext}"
    );
    assert_eq!(usage["prompt_tokens"].as_u64().unwrap(), first_fed);

    // The client sends the conversation back with one more message: only that is fed.
    let mut messages = first_messages.clone();
    messages.push(json!({"role": "assistant", "content": reply}));
    messages.push(user("and again"));
    let (status, second) = post(&url, &json!({"messages": messages, "max_tokens": 6}));
    assert_eq!(status, 200, "{second}");
    let ext = &second["usage"]["lambdachat"];
    assert_eq!(ext["continued"], true, "{second}");
    let reused = ext["tokens_reused"].as_u64().unwrap();
    assert_eq!(reused, first_fed + completion);
    let fed = ext["tokens_fed"].as_u64().unwrap();
    assert!(fed < first_fed, "fed {fed} for one short message");
    assert_eq!(
        second["usage"]["prompt_tokens"].as_u64().unwrap(),
        reused + fed
    );
    assert!(ext["tokens_seen"].as_u64().unwrap() > 32, "past the window");
    assert!(ext["tokens_evicted"].as_u64().unwrap() > 0);
    assert!(ext["tokens_attended"].as_u64().unwrap() <= 4 + 32);

    // The same conversation with another reply in it is not the held one: read whole.
    let mut other = first_messages.clone();
    other.push(json!({"role": "assistant", "content": "something else"}));
    other.push(user("and again"));
    let (status, third) = post(&url, &json!({"messages": other, "max_tokens": 2}));
    assert_eq!(status, 200, "{third}");
    let ext = &third["usage"]["lambdachat"];
    assert_eq!(ext["continued"], false);
    assert!(ext["tokens_fed"].as_u64().unwrap() > first_fed);
}

/// The SSE lines' JSON payloads, up to and including `[DONE]` (as the string "[DONE]").
fn stream(url: &str, body: &Value) -> Vec<Value> {
    let response = ureq::post(url).send_json(body.clone()).unwrap();
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    let mut events = Vec::new();
    for line in BufReader::new(response.into_reader()).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            events.push(Value::String(data.into()));
            break;
        }
        events.push(serde_json::from_str(data).unwrap());
    }
    events
}

#[test]
fn streaming_gives_the_same_reply_in_chunks() {
    let base = start(Options::default());
    let url = format!("{base}/v1/chat/completions");
    let body = json!({"messages": [user("tell me a story")], "max_tokens": 12});
    let (_, whole) = post(&url, &body);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = stream(&url, &streamed);
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(events[0]["object"], "chat.completion.chunk");
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let n = events.len();
    let usage = &events[n - 2];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"]["completion_tokens"],
        whole["usage"]["completion_tokens"]
    );
    let finish = &events[n - 3]["choices"][0];
    assert_eq!(
        finish["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    let text: String = events[..n - 3]
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    // Without include_usage: no usage chunk.
    streamed["stream_options"] = json!({"include_usage": false});
    let events = stream(&url, &streamed);
    assert!(events.iter().all(|e| e.get("usage").is_none()));
}

#[test]
fn a_stop_sequence_ends_the_reply_before_it() {
    let base = start(Options::default());
    let url = format!("{base}/v1/chat/completions");
    let body = json!({"messages": [user("count")], "max_tokens": 24});
    let (_, whole) = post(&url, &body);
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap();
    // A stop sequence from the middle of the greedy reply.
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 6, "a reply long enough to cut: {text:?}");
    let stop: String = chars[3..5].iter().collect();
    let expected = &text[..text.find(&stop).unwrap()];
    let mut cut = body.clone();
    cut["stop"] = json!([stop]);
    let (_, stopped) = post(&url, &cut);
    assert_eq!(stopped["choices"][0]["message"]["content"], expected);
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    // The cache read the stop sequence, which the client never saw: the conversation is read
    // again rather than continued with text the client does not know.
    let messages =
        json!([user("count"), {"role": "assistant", "content": expected}, user("go on")]);
    let (_, next) = post(&url, &json!({"messages": messages, "max_tokens": 2}));
    assert_eq!(next["usage"]["lambdachat"]["continued"], false, "{next}");
}

#[test]
fn the_api_key_guards_everything_but_health() {
    let base = start(Options {
        key: Some("sesame"),
        ..Options::default()
    });
    assert_eq!(
        ureq::get(&format!("{base}/health"))
            .call()
            .unwrap()
            .status(),
        200
    );
    let models = format!("{base}/v1/models");
    match ureq::get(&models).call() {
        Err(ureq::Error::Status(401, r)) => {
            let body: Value = r.into_json().unwrap();
            assert_eq!(body["error"]["code"], "invalid_api_key");
        }
        other => panic!("expected 401, got {other:?}"),
    }
    let wrong = ureq::get(&models)
        .set("Authorization", "Bearer sesam")
        .call();
    assert!(matches!(wrong, Err(ureq::Error::Status(401, _))));
    let list: Value = ureq::get(&models)
        .set("Authorization", "Bearer sesame")
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(list["data"][0]["id"], "tiny");
}

#[test]
fn bad_requests_get_openais_errors() {
    let base = start(Options::default());
    let url = format!("{base}/v1/chat/completions");
    let raw = |body: &str| match ureq::post(&url)
        .set("Content-Type", "application/json")
        .send_string(body)
    {
        Err(ureq::Error::Status(code, r)) => (code, r.into_json::<Value>().unwrap()),
        other => panic!("expected an error, got {other:?}"),
    };
    let (code, body) = raw("{not json");
    assert_eq!(code, 400);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let (code, _) = raw(r#"{"messages": "no"}"#);
    assert_eq!(code, 422);
    let (code, body) =
        raw(r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}"#);
    assert_eq!(code, 400);
    assert_eq!(body["error"]["param"], "max_tokens");
    // A body announced larger than the limit is refused from its headers, before it is sent
    // (a client still writing it when the server answers could see its connection reset).
    let mut stream = std::net::TcpStream::connect(base.trim_start_matches("http://")).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{{\"messages\": [",
        5 << 20
    );
    std::io::Write::write_all(&mut stream, head.as_bytes()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut status = String::new();
    BufReader::new(&stream).read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 413"), "{status:?}");
    match ureq::get(&format!("{base}/v1/nothing")).call() {
        Err(ureq::Error::Status(404, r)) => {
            let body: Value = r.into_json().unwrap();
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("/v1/nothing")
            );
        }
        other => panic!("expected 404, got {other:?}"),
    }
}

#[test]
fn a_full_queue_answers_429_and_a_client_that_leaves_frees_the_model() {
    let base = start(Options {
        queue: 0,
        max_tokens: 1_000_000,
        ..Options::default()
    });
    let url = format!("{base}/v1/chat/completions");
    // A reply that would run for a long time, streamed; its first text shows it is running.
    // (The tiny model soon goes on with tokens that show no text: the server must notice a
    // client's leaving without text to send.)
    let long =
        json!({"messages": [user("go on forever")], "max_tokens": 1_000_000, "stream": true});
    let response = ureq::post(&url).send_json(long).unwrap();
    let mut lines = BufReader::new(response.into_reader()).lines();
    let mut texts = 0;
    while texts < 1 {
        let line = lines.next().unwrap().unwrap();
        if line.contains("\"content\":\"") && !line.contains("\"content\":\"\"") {
            texts += 1;
        }
        assert!(
            !line.contains("finish_reason\":\""),
            "it ended early: {line}"
        );
    }
    let busy = ureq::post(&url).send_json(json!({"messages": [user("me too")], "max_tokens": 1}));
    match busy {
        Err(ureq::Error::Status(429, r)) => {
            assert_eq!(r.header("retry-after"), Some("1"));
            let body: Value = r.into_json().unwrap();
            assert_eq!(body["error"]["code"], "server_busy");
        }
        other => panic!("expected 429, got {other:?}"),
    }
    // The client goes away: generation stops at its next token and the model is free again.
    drop(lines);
    let start = Instant::now();
    loop {
        let (status, _) = post(
            &url,
            &json!({"messages": [user("me too")], "max_tokens": 1}),
        );
        if status == 200 {
            break;
        }
        assert_eq!(status, 429);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still busy after the client left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_exposed_server_needs_a_key() {
    assert!(server::check_exposure("127.0.0.1", None).is_ok());
    assert!(server::check_exposure("::1", None).is_ok());
    assert!(server::check_exposure("localhost", None).is_ok());
    let e = server::check_exposure("0.0.0.0", None).unwrap_err();
    assert!(e.to_string().contains("--api-key"), "{e}");
    assert!(server::check_exposure("0.0.0.0", Some("")).is_err());
    assert!(server::check_exposure("0.0.0.0", Some("k")).is_ok());
}

/// Reads what the server sends until it closes the connection (or 5 s pass: a failure).
fn read_until_closed(stream: &mut std::net::TcpStream) -> (String, Duration) {
    use std::io::Read;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the connection stayed open: {e}"),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), start.elapsed())
}

#[test]
fn slow_and_idle_clients_are_cut_off() {
    use std::io::Write;
    let base = start(Options {
        read_timeout: Duration::from_secs(1),
        ..Options::default()
    });
    let addr = base.trim_start_matches("http://");
    // Headers that never end.
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let (_, waited) = read_until_closed(&mut slow);
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    // A body that stops short of its length: 408 in OpenAI's shape.
    let mut short = std::net::TcpStream::connect(addr).unwrap();
    short
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mess",
        )
        .unwrap();
    let (answer, _) = read_until_closed(&mut short);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    // A kept-alive connection left idle after its request.
    let mut idle = std::net::TcpStream::connect(addr).unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (answer, waited) = read_until_closed(&mut idle);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        waited < Duration::from_secs(3),
        "closed when idle: {waited:?}"
    );
}

/// `/v1/completions` continues a text with no template: the prompt alone is fed (no chat
/// scaffolding), streaming gives the same text, `echo` repeats the prompt, and a prompt that
/// extends an earlier prompt and its completion continues that text's cache.
#[test]
fn a_raw_completion_continues_the_text() {
    let base = start(Options::default());
    let url = format!("{base}/v1/completions");
    let prompt = "once upon a time";
    let (status, whole) = post(&url, &json!({"prompt": prompt, "max_tokens": 5}));
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "text_completion");
    assert!(whole["id"].as_str().unwrap().starts_with("cmpl-"));
    let choice = &whole["choices"][0];
    assert_eq!(choice["logprobs"], Value::Null);
    assert_eq!(choice["finish_reason"], "length");
    let text = choice["text"].as_str().unwrap().to_string();
    let usage = &whole["usage"];
    assert_eq!(usage["completion_tokens"], 5);
    // The chat template would add its turn markers around the prompt: a raw prompt is its own
    // tokens (and the BOS) only.
    let (_, chat) = post(
        &format!("{base}/v1/chat/completions"),
        &json!({"messages": [user(prompt)], "max_tokens": 1}),
    );
    let raw_prompt = usage["prompt_tokens"].as_u64().unwrap();
    assert!(raw_prompt < chat["usage"]["prompt_tokens"].as_u64().unwrap());
    assert_eq!(usage["lambdachat"]["continued"], false);

    let mut streamed = json!({"prompt": prompt, "max_tokens": 5, "stream": true,
        "stream_options": {"include_usage": true}});
    let events = stream(&url, &streamed);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let n = events.len();
    assert!(
        events[..n - 1]
            .iter()
            .all(|e| e["object"] == "text_completion")
    );
    assert_eq!(events[n - 2]["choices"], json!([]));
    assert_eq!(events[n - 3]["choices"][0]["finish_reason"], "length");
    let pieces: String = events[..n - 3]
        .iter()
        .map(|e| e["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(pieces, text);
    streamed["echo"] = json!(true);
    streamed["stream"] = json!(false);
    let (_, echoed) = post(&url, &streamed);
    assert_eq!(echoed["choices"][0]["text"], format!("{prompt}{text}"));

    // The text so far, and more: only the new part is fed.
    let longer = format!("{prompt}{text} and then");
    let (_, next) = post(&url, &json!({"prompt": longer, "max_tokens": 2}));
    let ext = &next["usage"]["lambdachat"];
    assert_eq!(ext["continued"], true, "{next}");
    assert_eq!(ext["tokens_reused"].as_u64().unwrap(), raw_prompt + 5);
    // At most a token per byte of the new text, and the completion's last token (pending).
    let fed = ext["tokens_fed"].as_u64().unwrap();
    assert!(fed > 0 && fed <= " and then".len() as u64 + 1, "{ext}");
    // A chat never continues a raw text, nor a text a chat.
    let (_, chat) = post(
        &format!("{base}/v1/chat/completions"),
        &json!({"messages": [user(&longer)], "max_tokens": 1}),
    );
    assert_eq!(chat["usage"]["lambdachat"]["continued"], false);
    let (status, e) = post(&url, &json!({"prompt": ""}));
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("prompt"))
    );
}

/// A greedy reply's text and its `usage.lambdachat`.
fn chat(base: &str, messages: &[Value]) -> (String, Value) {
    let (status, body) = post(
        &format!("{base}/v1/chat/completions"),
        &json!({"messages": messages, "max_tokens": 6}),
    );
    assert_eq!(status, 200, "{body}");
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    (text.to_string(), body["usage"]["lambdachat"].clone())
}

/// Beyond `--conversations`, idle conversations wait on disk and come back on their next
/// request exactly as they were (the same greedy reply as a server that kept them in RAM),
/// also for a server started later on the same store; at most `max` wait there.
#[test]
fn idle_conversations_wait_on_disk_and_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("saved").join("conversations.db");
    let on_disk = start(Options {
        conversations: 1,
        saved: Some((db.clone(), 2)),
        ..Options::default()
    });
    let in_ram = start(Options::default());
    let a = vec![user("tell me about cats")];
    let b = vec![user("tell me about dogs")];
    let (reply_a, first) = chat(&on_disk, &a);
    assert_eq!(chat(&in_ram, &a).0, reply_a);
    let (reply_b, _) = chat(&on_disk, &b); // A goes to disk
    chat(&in_ram, &b);
    let more = |m: &[Value], reply: &str| {
        let mut m = m.to_vec();
        m.push(json!({"role": "assistant", "content": reply}));
        m.push(user("and more"));
        m
    };
    let (again, ext) = chat(&on_disk, &more(&a, &reply_a)); // A back, B to disk
    assert_eq!(
        (&ext["continued"], &ext["restored"]),
        (&json!(true), &json!(true)),
        "{ext}"
    );
    let seen = first["tokens_seen"].as_u64().unwrap();
    assert!(
        ext["tokens_reused"].as_u64().unwrap() >= seen,
        "{ext} after {first}"
    );
    let (in_ram_again, ext) = chat(&in_ram, &more(&a, &reply_a));
    assert_eq!(again, in_ram_again);
    assert_eq!(
        (&ext["continued"], &ext["restored"]),
        (&json!(true), &json!(false)),
        "{ext}"
    );

    // Another server on the same store finds B there (once the first has written it: that
    // happens after the reply was sent).
    saved_rows_become(&db, 2);
    let later = start(Options {
        conversations: 1,
        saved: Some((db.clone(), 2)),
        ..Options::default()
    });
    let (again_b, ext) = chat(&later, &more(&b, &reply_b));
    assert_eq!(ext["continued"], true, "{ext}");
    assert_eq!(again_b, chat(&in_ram, &more(&b, &reply_b)).0);

    // More conversations than the store keeps: the least recently used go.
    let db = dir.path().join("capped").join("conversations.db");
    let capped = start(Options {
        conversations: 1,
        saved: Some((db.clone(), 2)),
        ..Options::default()
    });
    for topic in ["birds", "fish", "frogs", "bees", "ants"] {
        chat(&capped, &[user(&format!("tell me about {topic}"))]);
    }
    saved_rows_become(&db, 2);
}

/// Waits until the saved store at `db` holds `n` saved conversations: the generator saves an
/// idle one after it sent the reply that made it idle.
fn saved_rows_become(db: &std::path::Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = lambdachat::store::Store::open(db).unwrap().list().unwrap();
        // A row is created, then its conversation saved into it.
        if rows.len() == n && rows.iter().all(|r| r.messages > 0) {
            return;
        }
        let titles: Vec<_> = rows.iter().map(|r| r.title.clone()).collect();
        assert!(Instant::now() < deadline, "{titles:?}, not {n} rows");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// With no room to wait (`--queue 0`), requests sent one after another are never refused: a
/// request that follows a finished reply gets the generator even while it still tidies up
/// after that reply (keeping the conversation, saving an idle one to disk).
#[test]
fn requests_one_after_another_are_never_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = start(Options {
        queue: 0,
        conversations: 1,
        saved: Some((dir.path().join("c.db"), 2)),
        ..Options::default()
    });
    let url = format!("{base}/v1/chat/completions");
    for i in 0..20 {
        let body = json!({"messages": [user(&format!("question {i}"))], "max_tokens": 2});
        let (status, reply) = post(&url, &body);
        assert_eq!(status, 200, "request {i}: {reply}");
    }
}
