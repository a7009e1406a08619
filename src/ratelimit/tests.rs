//! Keys from configuration strings and requests.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue};

use super::*;

#[test]
fn key_kinds_parse_and_name_what_is_wrong() {
    assert_eq!("ip".parse(), Ok(KeyKind::Ip));
    assert_eq!("route".parse(), Ok(KeyKind::Route));
    assert_eq!("global".parse(), Ok(KeyKind::Global));
    let header: KeyKind = "header:X-Api-Key".parse().unwrap();
    assert_eq!(
        header,
        KeyKind::Header(HeaderName::from_static("x-api-key"))
    );
    assert_eq!(header.to_string(), "header:x-api-key");

    let unknown = "cookie".parse::<KeyKind>().unwrap_err();
    assert_eq!(unknown, KeyKindError::Unknown("cookie".to_owned()));
    assert_eq!(
        unknown.to_string(),
        r#"rate limit key "cookie" must be ip, header:NAME, route or global"#
    );
    for bad in ["header:", "header:x api key", "header:é"] {
        assert_eq!(
            bad.parse::<KeyKind>(),
            Err(KeyKindError::BadHeader(bad.to_owned()))
        );
    }
    assert!(matches!(
        "IP".parse::<KeyKind>(),
        Err(KeyKindError::Unknown(_))
    ));
}

#[test]
fn header_keys_fall_back_to_the_client_ip() {
    let kind: KeyKind = "header:x-api-key".parse().unwrap();
    let client = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    let mut headers = HeaderMap::new();
    assert_eq!(kind.key_for(client, &headers, "/api"), Key::ip(client));
    headers.insert("x-api-key", HeaderValue::from_static(""));
    assert_eq!(
        kind.key_for(client, &headers, "/api"),
        Key::ip(client),
        "an empty header is no key"
    );

    headers.insert("x-api-key", HeaderValue::from_static("k-1"));
    let with_key = kind.key_for(client, &headers, "/api");
    assert_eq!(with_key, Key::hashed(b"k-1"));
    assert_ne!(with_key, Key::ip(client));
    let elsewhere = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
    assert_eq!(
        kind.key_for(elsewhere, &headers, "/other"),
        with_key,
        "the key follows the header, not the address or route"
    );
    headers.insert("x-api-key", HeaderValue::from_static("k-2"));
    assert_ne!(kind.key_for(client, &headers, "/api"), with_key);

    assert_eq!(
        KeyKind::Route.key_for(client, &headers, "/api"),
        KeyKind::Route.key_for(elsewhere, &HeaderMap::new(), "/api")
    );
    assert_ne!(
        KeyKind::Route.key_for(client, &headers, "/api"),
        KeyKind::Route.key_for(client, &headers, "/other")
    );
    assert_eq!(
        KeyKind::Global.key_for(client, &headers, "/api"),
        Key::GLOBAL
    );
}

#[test]
fn ipv6_clients_count_by_their_64() {
    let a: Ipv6Addr = "2001:db8:1:2::1".parse().unwrap();
    let b: Ipv6Addr = "2001:db8:1:2:ffff::9".parse().unwrap();
    let other: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
    assert_eq!(Key::ip(a.into()), Key::ip(b.into()));
    assert_ne!(Key::ip(a.into()), Key::ip(other.into()));
    let mapped: Ipv6Addr = "::ffff:192.0.2.1".parse().unwrap();
    assert_eq!(
        Key::ip(mapped.into()),
        Key::ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)))
    );
}
