//! The REST API on any call: a status and a JSON body, never a panic. The input is cut at 0xff
//! bytes into method, path, query and body; with the first byte odd, the call is signed with the
//! app's secret, so the routes behind the signature check are reached too.
#![no_main]

use std::time::Instant;

use flux::apps::{AppConfig, Apps};
use flux::config::Config;
use flux::fanout::directory::Directory;
use flux::http::Request;
use flux::pusher::presence::Membership;
use flux::pusher::rest::{self, RestContext};
use flux::pusher::signature::{sign_query, Verifier};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest_of)) = data.split_first() else { return };
    let mut parts = rest_of.split(|&b| b == 0xff);
    let text = |part: Option<&[u8]>| String::from_utf8_lossy(part.unwrap_or_default()).into_owned();
    let method = ["GET", "POST", "PUT"][usize::from(flags >> 1) % 3];
    let path = format!("/apps/app-id/{}", text(parts.next()));
    let mut query = text(parts.next());
    let body = parts.next().unwrap_or_default().to_vec();
    let apps = Apps::new(vec![AppConfig::from_settings(&Config::default())]);
    let unix_now = 1_700_000_000;
    if flags & 1 == 1 {
        let (_, app) = apps.by_id("app-id").expect("the app");
        query = sign_query(&app.app, method, &path, &body, &[], unix_now);
    }
    let request = Request { method: method.into(), path, query, headers: Vec::new(), body, close: false };
    let response = match rest::resolve(&request, &apps) {
        Err(refused) => refused,
        Ok((index, app, rates)) => {
            let (directory, membership) = (Directory::new(2), Membership::default());
            let context =
                RestContext { app, index, directory: &directory, membership: &membership, unix_now, rates: (rates, Instant::now()) };
            rest::handle(&request, &context, &mut Verifier::default()).response
        }
    };
    assert!((200..600).contains(&response.status));
    assert!(serde_json::from_slice::<serde_json::Value>(&response.body).is_ok());
});
