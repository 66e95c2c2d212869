//! RabbitMQ in tests: a queue that sees every event a test's exchange receives.

use devgate::mq::{Mq, QueueType};
use lapin::{
    options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};

/// Declares (through `mq`, as the relay would) the events exchange of `mq`'s prefix, an
/// exclusive queue named after `name` bound to it with `#`, and a consumer without acks.
pub async fn bind_all(mq: &Mq, name: &str) -> (lapin::Channel, lapin::Consumer, String) {
    let channel = mq.channel().await.expect("RabbitMQ at 127.0.0.1:5672");
    let queue = mq.queue_name(name);
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            QueueType::Classic.arguments(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.as_str().into(),
            mq.events_exchange().as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let consumer = channel
        .basic_consume(
            queue.as_str().into(),
            name.into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    (channel, consumer, queue)
}
