//! Decoding arbitrary bytes returns an error or a value and never panics.

use ferry_proto::codec::{decode_frame, encode_frame};
use ferry_proto::wire::{ClientRequest, ClientResponse};
use ferry_proto::{
    validate_stream_name, Event, EventBatch, Limits, StoredBatch, StreamEvent, Subject, TopicConfig,
};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_frame::<ClientRequest>("request", &bytes, Limits::DEFAULT_MAX_FRAME);
        let _ = decode_frame::<ClientResponse>("response", &bytes, Limits::DEFAULT_MAX_FRAME);
        let _ = ferry_proto::codec::decode::<Vec<Event>>("events", &bytes);
        let _ = ferry_proto::codec::decode::<StoredBatch>("batch", &bytes);
    }

    #[test]
    fn mutated_valid_frames_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let event = Event::new("id-1", "/src", "t", Subject::new("a.b").unwrap(), vec![1u8; 40]).with_key("k");
        let batch = EventBatch::new(&[event.clone(), event], Some(3), 0, &Limits::default()).unwrap();
        let request = ClientRequest::Publish { topic: "orders".into(), partition: 1, batch };
        let mut frame = encode_frame("request", &request, Limits::DEFAULT_MAX_FRAME).unwrap().to_vec();
        for (at, value) in flips {
            let i = at % frame.len();
            frame[i] ^= value;
        }
        if let Ok(ClientRequest::Publish { batch, .. }) = decode_frame::<ClientRequest>("request", &frame, Limits::DEFAULT_MAX_FRAME) {
            let _ = batch.decode_events(&Limits::default());
        }
        let _ = decode_frame::<ClientRequest>("request", &frame[..frame.len() / 2], Limits::DEFAULT_MAX_FRAME);
    }

    #[test]
    fn topic_configs_round_trip(name in "[a-z]{1,20}", partitions in 1u32..100) {
        let topic = TopicConfig::new(name, partitions);
        let frame = encode_frame("t", &ClientRequest::CreateTopic(topic.clone()), 1 << 20).unwrap();
        prop_assert_eq!(decode_frame::<ClientRequest>("t", &frame, 1 << 20).unwrap(), ClientRequest::CreateTopic(topic));
    }

    #[test]
    fn stream_messages_round_trip(stream in "[A-Za-z0-9_.:-]{1,128}", expected in proptest::option::of(any::<u64>()), version in any::<u64>()) {
        prop_assert!(validate_stream_name(&stream).is_ok());
        let event = Event::new("id-1", "/src", "t", Subject::new("a.b").unwrap(), vec![1u8; 4]);
        let batch = EventBatch::new(std::slice::from_ref(&event), None, 0, &Limits::default()).unwrap();
        let requests = [
            ClientRequest::AppendToStream { topic: "orders".into(), partition: 1, stream: stream.clone(), expected_version: expected, batch },
            ClientRequest::ReadStream { topic: "orders".into(), partition: 1, stream, from_version: version, max_events: 7 },
        ];
        for request in requests {
            let frame = encode_frame("t", &request, 1 << 20).unwrap();
            prop_assert_eq!(decode_frame::<ClientRequest>("t", &frame, 1 << 20).unwrap(), request);
        }
        let response = ClientResponse::StreamEvents { version, events: vec![StreamEvent { version, offset: 3, appended_at_ms: 4, event }] };
        let frame = encode_frame("t", &response, 1 << 20).unwrap();
        prop_assert_eq!(decode_frame::<ClientResponse>("t", &frame, 1 << 20).unwrap(), response);
    }
}
