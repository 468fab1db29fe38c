//! The transactional producer on its own, on a real broker (as rust-rdkafka's transaction tests do):
//! a committed batch is visible with its offsets; a failed one leaves nothing visible and the committed
//! offsets unchanged, and names the record the broker refused; a fenced producer fails and is replaced.

mod common;

use std::time::Duration;

use common::Env;
use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};
use switchyard::config::RECORD_LIMIT;
use switchyard::kafka::txn::TxnProducer;
use switchyard::kafka::{self, OutRecord};
use switchyard::shutdown::ShutdownTrigger;

const LIMIT: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_transactions_leave_nothing_and_fenced_producers_are_replaced() {
    let Some(env) = Env::new("txn").await else { return };
    let (input, output) = (env.config.topics.requests.clone(), env.config.topics.decisions.clone());
    env.produce((0..10).map(|i| OutRecord::new(input.clone(), format!("k{i}"), vec![i])).collect()).await;
    let group = format!("{}-txn", env.config.service.group_id);
    let consumer = kafka::group_consumer(&env.config, &group, None).unwrap();
    consumer.subscribe(&[input.as_str()]).unwrap();
    let mut read = 0;
    while read < 10 {
        read += kafka::batch::next_batch(&consumer, 10, Duration::from_millis(200), LIMIT).await.unwrap().len();
    }
    let committed_offset = |consumer: &rdkafka::consumer::StreamConsumer<_>| -> i64 {
        let committed = kafka::batch::committed(consumer).unwrap();
        committed.elements().iter().map(|e| if let Offset::Offset(n) = e.offset() { n } else { 0 }).sum()
    };
    let offsets = |to: i64| {
        let mut list = TopicPartitionList::new();
        for partition in 0..env.config.topics.partitions {
            list.add_partition_offset(&input, partition, Offset::Offset(to.min(10))).unwrap();
        }
        list
    };
    let out = |n: usize, tag: &str| -> Vec<OutRecord> {
        (0..n).map(|i| OutRecord::new(output.clone(), format!("k{i}"), format!("{tag}-{i}").into_bytes())).collect()
    };
    let (_trigger, shutdown) = ShutdownTrigger::new();
    let id = format!("{}-txn-producer", env.config.service.group_id);
    let mut producer = TxnProducer::new(&env.config, id.clone(), shutdown).unwrap();

    // Committed: records visible, offsets moved.
    producer.commit(&out(5, "first"), &offsets(0), consumer.group_metadata().as_ref()).await.expect("first commit");
    assert_eq!(env.read_raw(&output, 5, LIMIT, SETTLE).await.len(), 5);
    let before = committed_offset(&consumer);

    // One record too large for any topic: the transaction fails, names it, and leaves nothing behind.
    let mut records = out(4, "aborted");
    records.insert(2, OutRecord::new(output.clone(), "big", vec![7u8; RECORD_LIMIT + 1]));
    let failure =
        producer.commit(&records, &offsets(3), consumer.group_metadata().as_ref()).await.expect_err("refused");
    assert_eq!(failure.refused.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![2], "{failure:?}");
    let visible = env.read_raw(&output, 5, LIMIT, SETTLE).await;
    assert_eq!(visible.len(), 5, "nothing of the aborted transaction is visible to read_committed readers");
    assert!(visible.iter().all(|r| r.value.starts_with(b"first")));
    assert_eq!(committed_offset(&consumer), before, "committed offsets unchanged after the abort");

    // Fenced by another producer with the same transactional id: the commit fails, the producer is
    // replaced, and the next commit goes through.
    let fencer = kafka::transactional_producer(&env.config, &id).unwrap();
    tokio::task::block_in_place(|| rdkafka::producer::Producer::init_transactions(&fencer, LIMIT)).unwrap();
    assert!(producer.commit(&out(2, "fenced"), &offsets(3), consumer.group_metadata().as_ref()).await.is_err());
    producer
        .commit(&out(2, "after"), &offsets(3), consumer.group_metadata().as_ref())
        .await
        .expect("replaced producer commits");
    let visible = env.read_raw(&output, 7, LIMIT, SETTLE).await;
    assert_eq!(visible.len(), 7);
    assert!(!visible.iter().any(|r| r.value.starts_with(b"fenced") || r.value.starts_with(b"aborted")));
    assert!(committed_offset(&consumer) > before, "offsets committed with the last transaction");
}
