"""RabbitMQ's Python client (pika) for the event hose's broker tests.

Usage:
  amqp_queue.py PORT declare EXCHANGE QUEUE   durable topic exchange, durable queue
                                              bound with "#"
  amqp_queue.py PORT drain QUEUE OUT IDLE     every message, one JSON line each
                                              (routing key, properties, body) into
                                              OUT, until none came for IDLE seconds
"""

import json
import sys

import pika

port, verb = int(sys.argv[1]), sys.argv[2]
params = pika.ConnectionParameters(
    host="127.0.0.1", port=port, credentials=pika.PlainCredentials("guest", "guest")
)
connection = pika.BlockingConnection(params)
channel = connection.channel()
if verb == "declare":
    exchange, queue = sys.argv[3], sys.argv[4]
    channel.exchange_declare(exchange=exchange, exchange_type="topic", durable=True)
    channel.queue_declare(queue=queue, durable=True)
    channel.queue_bind(queue=queue, exchange=exchange, routing_key="#")
elif verb == "drain":
    queue, out, idle = sys.argv[3], sys.argv[4], float(sys.argv[5])
    with open(out, "w") as f:
        for method, props, body in channel.consume(queue, inactivity_timeout=idle):
            if method is None:
                break
            f.write(json.dumps({
                "routing_key": method.routing_key,
                "message_id": props.message_id,
                "type": props.type,
                "content_type": props.content_type,
                "delivery_mode": props.delivery_mode,
                "app_id": props.app_id,
                "body": json.loads(body),
            }) + "\n")
            channel.basic_ack(method.delivery_tag)
    channel.cancel()
connection.close()
