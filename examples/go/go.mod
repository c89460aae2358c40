module example.com/busserve-client

go 1.21

require github.com/nats-io/nats.go v1.37.0
